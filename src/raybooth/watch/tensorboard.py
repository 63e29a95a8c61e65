"""Rank 0's TensorBoard event files: loss per step, learning rate and throughput per report,
validation grids. Ranks other than 0, and --report_to none, get a board that writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Board:
    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def steps(self, rows: list[dict]) -> None:
        """One point per optimizer step: the loss and its two parts, averaged over workers."""
        if self.writer is None:
            return
        for row in rows:
            for key in ("loss", "instance_loss", "prior_loss"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def report(self, step: int, learning_rate: float | None, images_per_s: float, steps_per_s: float) -> None:
        if self.writer is None:
            return
        if learning_rate is not None:
            self.writer.add_scalar("train/learning_rate", learning_rate, step)
        self.writer.add_scalar("throughput/images_per_s", images_per_s, step)
        self.writer.add_scalar("throughput/steps_per_s", steps_per_s, step)
        self.writer.flush()  # a report is when the user looks

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
