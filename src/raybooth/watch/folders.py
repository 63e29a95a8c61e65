"""Where a run's logs go: a subfolder per run (named by its start time) holding TensorBoard's
event file, the validation grids and Ray's own output (ray.log).

--logging_dir is diffusers' name and meaning: a folder joined onto --output_dir (default `logs`),
or an absolute path. Inside the output, which appears only when a run finishes, whole, the logs
are written in Ray Train's run folder meanwhile (kept with the checkpoints, and with the error
log of a failed run) and move into the output with the model; elsewhere they are written in place.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raybooth.files.writes import move
from raybooth.terminal.log import log

RAY_LOG = "ray.log"
VALIDATION_DIR = "validation"


@dataclass(frozen=True)
class RunLogs:
    root: Path  # where the logs are while the run lasts: what `tensorboard --logdir` is given
    run: Path  # this run's folder in it
    in_output: Path | None  # where they end up inside the output folder; None: they stay in `root`

    @classmethod
    def for_run(cls, cfg, started: float, run_folder: Path | None, run_name: str) -> RunLogs:
        """`run_folder`: Ray Train's folder for the run on this machine (None on remote storage)."""
        output = Path(cfg.output_dir).expanduser().absolute()
        wanted = cfg.logs_root(cfg.output_dir)
        in_output = wanted.relative_to(output) if wanted.is_relative_to(output) else None
        root = wanted if in_output is None else (run_folder or Path(tempfile.gettempdir()) / run_name) / "logs"
        return cls(root, root / time.strftime("%Y%m%d-%H%M%S", time.localtime(started)), in_output)

    @property
    def ray_log(self) -> Path:
        return self.run / RAY_LOG

    @property
    def validation(self) -> Path:
        return self.run / VALIDATION_DIR

    def announce(self, cfg) -> None:
        """The TensorBoard command to watch the run with."""
        self.run.mkdir(parents=True, exist_ok=True)
        if cfg.report_to == "tensorboard":
            log(f"watch the run: tensorboard --logdir {self.root}")

    def final_run_folder(self, output_dir: Path) -> Path:
        """Where this run's folder is once the output is in place."""
        if self.in_output is None:
            return self.run
        return Path(output_dir).expanduser().absolute() / self.in_output / self.run.name

    def keep_with_output(self, output_dir: Path, partial: Path) -> None:
        """Into the output about to be swapped in: the logs of this run and of the earlier ones of
        this run folder (a resumed run's), and those in the output it replaces (--overwrite)."""
        if self.in_output is None:
            return
        target = partial / self.in_output
        target.mkdir(parents=True, exist_ok=True)
        replaced = Path(output_dir).expanduser().absolute() / self.in_output
        for folder in [*_entries(replaced), *_entries(self.root)]:
            if not (target / folder.name).exists():
                move(folder, target / folder.name)  # Ray Train's run folder may be on another filesystem
        with contextlib.suppress(OSError):  # emptied; Ray Train's run folder goes with the run
            self.root.rmdir()
        log(f"the run's logs (events, validation grids, {RAY_LOG}): {self.final_run_folder(output_dir)}; "
            f"tensorboard --logdir {replaced}")


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []
