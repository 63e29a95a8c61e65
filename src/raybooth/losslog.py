"""Per-step losses averaged over workers: the history the user sees, and the metrics each report
carries. Losses stay on the device until a report, since reading one each step would make the
host wait for the GPU each step."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from raybooth.errors import RayboothError
from raybooth.log import log
from raybooth.training import Loss


class LossLog:
    def __init__(self, total_steps: int, world_size: int, images_per_step: int, verbose: bool):
        self.total_steps, self.world_size, self.verbose = total_steps, world_size, verbose
        self.images_per_step = images_per_step  # over all workers
        self.pending: list[tuple[int, int, torch.Tensor]] = []
        self.history: list[dict] = []
        self.window: list[dict] = []  # the steps of the latest report
        self.last_report = time.monotonic()

    def add(self, step: int, epoch: int, loss: Loss) -> None:
        self.pending.append((step, epoch, torch.stack([loss.total, loss.instance, loss.prior])))

    def flush(self) -> dict:
        """Average the pending losses over workers into the history; return the window's means."""
        if self.pending:
            values = torch.stack([v for _, _, v in self.pending]).float()
            if self.world_size > 1:
                dist.all_reduce(values)
                values /= self.world_size
            for (step, epoch, _), (total, instance, prior) in zip(self.pending, values.tolist()):
                if not math.isfinite(total):  # every later step would train on NaN weights
                    raise RayboothError(f"the loss became {total} at step {step}: training stopped and nothing "
                                        "was written (a lower --lr or --max_grad_norm may help)")
                self.history.append({"step": step, "epoch": epoch + 1, "loss": total,
                                     "instance_loss": instance, "prior_loss": prior})
            window = self.window = self.history[-len(self.pending):]
            steps_per_s = len(window) / (time.monotonic() - self.last_report)
            self.pending, self.last_report = [], time.monotonic()
            if self.verbose:
                left = (self.total_steps - window[-1]["step"]) / steps_per_s
                log(f"step {window[-1]['step']}/{self.total_steps} epoch {window[-1]['epoch']} "
                    f"loss {_mean(window, 'loss'):.4f} (instance {_mean(window, 'instance_loss'):.4f}, "
                    f"prior {_mean(window, 'prior_loss'):.4f}) {steps_per_s:.2f} steps/s "
                    f"{steps_per_s * self.images_per_step:.1f} images/s, {left:.0f} s left")
        window = self.window
        if not window:
            return {"step": 0}
        return {"step": window[-1]["step"], "epoch": window[-1]["epoch"], "loss": _mean(window, "loss"),
                "instance_loss": _mean(window, "instance_loss"), "prior_loss": _mean(window, "prior_loss")}


def _mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)
