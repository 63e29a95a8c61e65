"""Checkpoints written while training goes on. The state is copied into page-locked host memory
(for SD-1.5's 12 GB of weights and AdamW state on an H100: 9 s the first time, while the memory is
pinned, 0.2 s after), then Ray Train's upload thread writes it, straight into the run's storage
folder when this node sees it, so nothing is copied after the write. Written in the loop, a
checkpoint cost 17-20 s of training; now the ones after the first cost 7.5 s, the steps running
slower while the write goes on (bench/RESULTS.md, issue 5)."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import ray.train

from raybooth.checkpoints import checkpoint_name, snapshot, write_snapshot


class CheckpointWriter:
    """One per worker. A checkpoint waits for the last one's write, so at most one copy of the
    state sits in host memory."""

    def __init__(self, rank: int, settings: dict, say: Callable[[str], None]):
        self.rank, self.settings, self.say = rank, settings, say
        self.written = threading.Event()
        self.written.set()

    def save(self, models, optimizer, metrics: dict, history: list, position: dict, step: int) -> None:
        self.written.wait()
        started = time.monotonic()  # after the wait: the messages time this checkpoint's copy and write
        state = snapshot(self.rank, models, optimizer, step, history, position, self.settings)
        self.say(f"checkpoint at step {step}: state copied in {time.monotonic() - started:.1f} s; "
                 "writing it while training")
        storage = ray.train.get_context().get_storage()
        self.written.clear()

        def write(scratch: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            try:
                persisted = write_to_storage(storage, scratch, name, self.rank, state)
            finally:
                self.written.set()
            self.say(f"checkpoint at step {step} written in {time.monotonic() - started:.1f} s")
            return persisted

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="raybooth-")),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC, checkpoint_upload_fn=write,
                         delete_local_checkpoint_after_upload=True)


def write_to_storage(storage, scratch: ray.train.Checkpoint, name: str, rank: int, state: dict) -> ray.train.Checkpoint:
    """Write `state` into the run's checkpoint folder `name` on Ray Train's `storage`: in place on a
    local (or shared) filesystem; elsewhere (cloud storage) into `scratch`, then uploaded."""
    if storage.storage_filesystem.type_name == "local":
        target = Path(storage.experiment_fs_path, name)
        write_snapshot(target, rank, state)
        return ray.train.Checkpoint.from_directory(target)
    write_snapshot(Path(scratch.path), rank, state)
    return storage.persist_current_checkpoint(scratch, name)
