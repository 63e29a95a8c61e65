"""What the training loop does for the user watching it, in a few calls: TensorBoard events and
validation grids on rank 0, and the time each phase of the worker took."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from raybooth.config.watch import METRICS_FILE
from raybooth.files.images import SHEET_PNG
from raybooth.files.writes import png_bytes, write_atomically
from raybooth.watch.folders import VALIDATION_DIR
from raybooth.watch.tensorboard import Board
from raybooth.watch.validation import grid, sample_validation_images


class RunWatch:
    def __init__(self, cfg, plan, rank: int, say: Callable[[str], None]):
        self.cfg, self.plan, self.say = cfg, plan, say
        self.folder = Path(plan.logs_dir) if plan.logs_dir is not None and rank == 0 else None
        self.board = Board(self.folder if cfg.report_to == "tensorboard" else None)
        self.phases: dict[str, float] = defaultdict(float)
        self.phase_started = time.monotonic()
        self.steps_run = 0  # by this run, not counting steps restored from a checkpoint

    def mark(self, phase: str) -> None:
        """The phase that ends now: setup, train, save or samples. Validation counts apart."""
        elapsed = time.monotonic() - self.phase_started
        self.phases[phase] += elapsed - (self.phases["validation"] if phase == "train" else 0.0)
        self.phase_started = time.monotonic()

    def after_step(self, step: int, models, losses) -> None:
        """Rank 0, every --validation_steps and at the last step: a grid of samples of the
        validation prompt, as a PNG and in TensorBoard. The other workers wait for it at the
        next all-reduce; its time is kept out of the throughput shown."""
        self.steps_run += 1
        total = self.plan.total_steps()
        if self.folder is None or not self.cfg.validation_prompt or (step % self.cfg.validation_steps
                                                                     and step != total):
            return
        started = time.monotonic()
        image = grid(sample_validation_images(models, Path(self.plan.model_dir), self.cfg, self.plan.resolution))
        path = self.folder / VALIDATION_DIR / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, png_bytes(Image.fromarray(image), **SHEET_PNG))  # training waits for it
        self.board.image("validation", step, image)
        elapsed = time.monotonic() - started
        self.phases["validation"] += elapsed
        losses.exclude(elapsed)
        self.say(f"validation grid at step {step} in {elapsed:.1f} s: {path}")

    def finish(self, metrics: dict, images_per_step: int, folder: Path | None) -> None:
        """Close the event file; rank 0 (`folder` given) leaves the last report's metrics, phase
        times and throughput in `folder`, where the driver finds them for metrics.json. (Ray Train
        hands the driver the metrics of checkpoints alone.)"""
        self.board.close()
        if folder is None:
            return
        train_s = self.phases.get("train", 0.0)
        numbers = {**metrics, "steps_run": self.steps_run, "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
                   "images_per_s": self.steps_run * images_per_step / train_s if train_s > 0 else None,
                   **gpu_memory()}
        (Path(folder) / METRICS_FILE).write_text(json.dumps(numbers, indent=1))


def gpu_memory() -> dict:
    """This worker's GPU memory at its peak (the room a larger --train_batch_size has), and how
    often the allocator had to free its cache to find room, each time a stall; nothing on CPU."""
    if not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats()
    return {"peak_gpu_memory_gib": round(stats["allocated_bytes.all.peak"] / 2**30, 2),
            "peak_gpu_reserved_gib": round(stats["reserved_bytes.all.peak"] / 2**30, 2),
            "gpu_allocation_retries": stats["num_alloc_retries"]}
