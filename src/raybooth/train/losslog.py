"""Per-step losses averaged over workers: the history the user sees, and the metrics each report
carries. Losses stay on the device until a report, since reading one each step would make the
host wait for the GPU each step."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from raybooth.errors import RayboothError
from raybooth.terminal.log import log
from raybooth.train.loss import Loss
from raybooth.watch.tensorboard import Board


class LossLog:
    def __init__(self, total_steps: int, world_size: int, images_per_step: int, verbose: bool,
                 optimizer: torch.optim.Optimizer | None = None, board: Board | None = None):
        self.total_steps, self.world_size, self.verbose = total_steps, world_size, verbose
        self.optimizer, self.board = optimizer, board or Board(None)
        self.images_per_step = images_per_step  # over all workers
        self.pending: list[tuple[int, int, torch.Tensor]] = []
        self.history: list[dict] = []
        self.window: list[dict] = []  # the steps of the latest report
        self.last_report = time.monotonic()

    def add(self, step: int, epoch: int, loss: Loss) -> None:
        self.pending.append((step, epoch, torch.stack([loss.total, loss.instance, loss.prior])))

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent on something else (a validation grid) out of the throughput."""
        self.last_report += seconds

    def learning_rate(self) -> float | None:
        """The optimizer's current rate (a scheduler may change it; it may be a 0-dim tensor); under
        Prodigy the step size it takes, its estimate d times the rate."""
        if self.optimizer is None:
            return None
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) * float(group.get("d", 1.0))

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
            lr, images_per_s = self.learning_rate(), steps_per_s * self.images_per_step
            self.board.steps(window)
            self.board.report(window[-1]["step"], lr, images_per_s, steps_per_s)
            if self.verbose:
                left = (self.total_steps - window[-1]["step"]) / steps_per_s
                rate = "" if lr is None else f" lr {lr:.3g}"
                log(f"step {window[-1]['step']}/{self.total_steps} epoch {window[-1]['epoch']} "
                    f"loss {_mean(window, 'loss'):.4f} (instance {_mean(window, 'instance_loss'):.4f}, "
                    f"prior {_mean(window, 'prior_loss'):.4f}){rate} {steps_per_s:.2f} steps/s "
                    f"{images_per_s:.1f} images/s, {left:.0f} s left")
        window = self.window
        if not window:
            return {"step": 0}
        return {"step": window[-1]["step"], "epoch": window[-1]["epoch"], "loss": _mean(window, "loss"),
                "instance_loss": _mean(window, "instance_loss"), "prior_loss": _mean(window, "prior_loss"),
                **({} if self.optimizer is None else {"lr": self.learning_rate()})}


def _mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)
