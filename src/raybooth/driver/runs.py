"""Ray Train's folder for the run that writes one output: named after the output, so that the same
command run again finds the checkpoints of the run it continues; kept while it holds something
to resume from or an error log, removed otherwise."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.files.checkpoints import (STATE, changed_flags, check_settings, is_complete, latest_checkpoint,
                                        read_state, resumable_flags, run_name, torn_checkpoints)
from raybooth.terminal.log import log

DEFAULT_STORAGE = "~/ray_results"  # Ray Train's own default, made explicit so both sides agree


def absolute_storage_path(storage_path: str | None) -> str:
    """A local folder made absolute (workers resolve relative paths elsewhere); URIs as given."""
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or DEFAULT_STORAGE).expanduser().absolute())


class RunFolder:
    def __init__(self, cfg):
        self.storage = absolute_storage_path(cfg.storage_path)
        self.name = run_name(cfg.output_dir)
        self.error_log: Path | None = None
        self.cfg = cfg

    @property
    def local_path(self) -> Path | None:
        """The run's folder on this machine; None on remote storage (a URI), where Ray alone looks."""
        return None if "://" in self.storage else Path(self.storage, self.name)

    def plan_resume(self, mode: str, settings: dict) -> str | None:
        """The checkpoint folder to start from (None: fresh, or whatever Ray Train holds for this run)."""
        if mode == "none":
            if self.local_path and self.local_path.exists():
                log(f"--resume_from_checkpoint none: removing the earlier checkpoints in {self.local_path}")
                shutil.rmtree(self.local_path)
            return None
        if mode == "latest":
            latest = latest_checkpoint(self.local_path) if self.local_path else None
            for torn in torn_checkpoints(self.local_path) if self.local_path else []:
                log(f"skipping the checkpoint {torn.name}: its write was cut short (files missing)")
            if latest is None:
                return None
            check_settings(latest, settings)
            log(f"an earlier run of this command left a checkpoint at step {read_state(latest)['step']}: resuming "
                "from it (--resume_from_checkpoint none starts over)")
            self.say_changed(latest)
            return str(latest)
        folder = Path(mode).expanduser().absolute()
        if not (folder / STATE).is_file():
            raise RayboothError(f"--resume_from_checkpoint {mode}: not a raybooth checkpoint folder (it has no {STATE})")
        read_state(folder)  # a damaged state is named as such
        if not is_complete(folder):
            raise RayboothError(f"--resume_from_checkpoint {mode}: the checkpoint is incomplete (its write was cut "
                                "short); pass an earlier one")
        check_settings(folder, settings)
        # A run of its own: the latest checkpoint of this output's usual run would take precedence.
        self.name += "-from-" + hashlib.sha1(str(folder).encode()).hexdigest()[:8]
        log(f"resuming from the checkpoint at step {read_state(folder)['step']} in {folder}")
        self.say_changed(folder)
        return str(folder)

    def say_changed(self, checkpoint: Path) -> None:
        changed = changed_flags(checkpoint, resumable_flags(self.cfg))
        if changed:
            log(f"resuming with changed settings, which take effect now: {', '.join(changed)}")

    def remove(self, result) -> None:
        """The finished run's folder: Ray Train's (`result.path`), or local mode's, which holds
        only the checkpoints written during the run, if any."""
        if result.path:
            result.filesystem.delete_dir(result.path)
        elif self.local_path and self.local_path.exists():
            shutil.rmtree(self.local_path)

    def after_failure(self, interrupted: bool) -> None:
        """Say how to resume, or remove a run folder that holds nothing to resume from."""
        if self.local_path is None or not self.local_path.exists():
            return
        latest = latest_checkpoint(self.local_path)
        for torn in torn_checkpoints(self.local_path):  # a worker's upload cut short as the run stopped
            log(f"the checkpoint {torn.name} was being written when the run stopped: it is lost")
        if latest:
            log(f"{'interrupted' if interrupted else 'stopped'} after the checkpoint at step "
                f"{read_state(latest)['step']}: re-run the same command to resume from it")
            return
        if interrupted:
            log("interrupted before the first checkpoint (--checkpointing_steps): nothing to resume from")
        if self.error_log is None:
            shutil.rmtree(self.local_path, ignore_errors=True)

    def write_error_log(self, text: str) -> Path:
        folder = self.local_path or Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self.error_log = folder / f"raybooth-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.error_log.write_text(text)
        return self.error_log
