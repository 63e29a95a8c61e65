"""Checkpoints written while training goes on. The state is copied (on the GPU when it has room
for a second copy: milliseconds; else into page-locked host memory: 9 s the first time for SD-1.5's
12 GB on an H100's host, while the memory is pinned, 0.2 s after), then Ray Train's upload thread
writes it, straight into the run's storage folder when this node sees it, so nothing is copied
after the write (in Ray Train's local mode, which keeps no checkpoints, a thread of ours writes
it). Training goes on meanwhile (on an H100 a checkpoint of SD-1.5 costs it about 1 s;
bench/RESULTS.md, issue 5), and the metric reports due before every worker's write is done are
skipped: Ray Train keeps reports in order, so one made now would wait for the write."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import ray.train
import torch
import torch.distributed as dist

from raybooth.files.checkpoints import checkpoint_name, complete_checkpoints
from raybooth.train.checkpoints import snapshot, snapshot_bytes, write_snapshot

DEVICE_HEADROOM = 2 * 2**30  # bytes left free beside a snapshot on the GPU, for the eager parts of a step


class CheckpointWriter:
    """One per worker. A checkpoint waits for the last one's write, so at most one copy of the
    state exists besides the model's own."""

    def __init__(self, rank: int, settings: dict, say: Callable[[str], None], local_run_dir: Path | None = None,
                 keep: int = 1, flags: dict | None = None):
        self.rank, self.settings, self.say, self.flags = rank, settings, say, flags
        self.local_run_dir, self.keep = local_run_dir, keep  # local mode: where checkpoints go, and how many stay
        self.written = threading.Event()
        self.written.set()
        self.device: torch.device | None = None  # set by a checkpoint: a write may be under way

    def save(self, models, optimizer, metrics: dict, history: list, position: dict, step: int) -> None:
        self.written.wait()
        started = time.monotonic()  # after the wait: the messages time this checkpoint's copy and write
        self.device = models.device
        on_device = self.rank == 0 and fits_beside(models, optimizer)
        copy_device = models.device if on_device else None
        state = snapshot(self.rank, models, optimizer, step, history, position, self.settings, on_device, self.flags)
        where = "on the GPU" if on_device else "to host memory"
        self.say(f"checkpoint at step {step}: state copied {where} in {time.monotonic() - started:.1f} s; "
                 "writing it while training")
        self.written.clear()

        def write(persist: Callable[[], ray.train.Checkpoint | None]) -> ray.train.Checkpoint | None:
            try:
                with writing_stream(copy_device):
                    persisted = persist()
            finally:
                state.clear()  # a snapshot on the GPU frees its memory now
                self.written.set()
            self.say(f"checkpoint at step {step} written in {time.monotonic() - started:.1f} s")
            return persisted

        if self.local_run_dir is not None:
            threading.Thread(target=write, args=(lambda: self.write_locally(checkpoint_name(step), state),),
                             name="raybooth-checkpoint", daemon=True).start()
            ray.train.report(metrics)
            return
        storage = ray.train.get_context().get_storage()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="raybooth-")),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=lambda scratch, name: write(
                             lambda: write_to_storage(storage, scratch, name, self.rank, state)),
                         delete_local_checkpoint_after_upload=True)

    def write_locally(self, name: str, state: dict) -> None:
        """Local mode: into the run folder, where a re-run of the command finds it; the oldest go
        beyond `keep`, as Ray Train's CheckpointConfig(num_to_keep) has them go."""
        write_snapshot(self.local_run_dir / name, self.rank, state)
        for old in complete_checkpoints(self.local_run_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Until the last checkpoint is written: Ray Train's final report waits for its uploads,
        local mode's does not."""
        self.written.wait()

    def writing(self) -> bool:
        """Whether any worker is still writing a checkpoint: the same answer on every worker, as
        each report is a barrier that all of them must enter (the answer is all-reduced)."""
        if self.device is None:  # no checkpoint since the last time none was being written
            return False
        busy = torch.tensor([0.0 if self.written.is_set() else 1.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(busy)
        if busy.item() > 0:
            return True
        self.device = None
        return False


def fits_beside(models, optimizer) -> bool:
    """Whether the GPU has room for a second copy of the state (with headroom to spare)."""
    device = models.device
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return snapshot_bytes(models, optimizer) + DEVICE_HEADROOM <= free + cached


@contextlib.contextmanager
def writing_stream(device: torch.device | None):
    """Copies from the GPU to the host on a stream of their own, after the work queued so far, so
    that the steps (or samples) on the default stream do not wait for them. Off a GPU (or with no
    device) nothing changes."""
    if device is None or device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.stream(stream):
        yield


def write_to_storage(storage, scratch: ray.train.Checkpoint, name: str, rank: int, state: dict) -> ray.train.Checkpoint:
    """Write `state` into the run's checkpoint folder `name` on Ray Train's `storage`: in place on a
    local (or shared) filesystem; elsewhere (cloud storage) into `scratch`, then uploaded."""
    if storage.storage_filesystem.type_name == "local":
        target = Path(storage.experiment_fs_path, name)
        write_snapshot(target, rank, state)
        return ray.train.Checkpoint.from_directory(target)
    write_snapshot(Path(scratch.path), rank, state)
    return storage.persist_current_checkpoint(scratch, name)
