"""The training loop each Ray Train worker runs: set up, train, save. Ray appears only where it
adds something: the worker's devices and rank, its dataset shard, and report/checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raybooth import __version__
from raybooth.config import TrainConfig
from raybooth.data import join_instance_and_class
from raybooth.errors import RayboothError
from raybooth.log import log, quiet_model_libraries
from raybooth.models import TRAINING_LOG, load_for_training, save_trained_modules
from raybooth.training import Loss, Precision, make_optimizer, train_step


def train_worker(loop_config: dict) -> None:
    cfg: TrainConfig = loop_config["config"]
    quiet_model_libraries()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    # Setup. With two GPUs per worker the text encoder takes the second one.
    devices = ray.train.torch.get_devices()
    device, text_encoder_device = devices[0], devices[-1]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)  # each worker draws its own noise and timesteps
    precision = Precision(cfg.mixed_precision, device)
    model_dir = Path(loop_config["model_dir"])
    if not (model_dir / "model_index.json").is_file():
        raise RayboothError(f"{model_dir} is not readable on {socket.gethostname()}: on several nodes, keep "
                            "the model on storage that every node shares")
    models = load_for_training(model_dir, device, text_encoder_device, precision.frozen_dtype,
                               cfg.train_text_encoder)
    if world_size > 1:
        models = models.data_parallel()
    optimizer = make_optimizer(models.trainable_parameters(), cfg.lr)
    losses = LossLog(total_steps=planned_steps(cfg, loop_config["pairs"], world_size), world_size=world_size,
                     verbose=rank == 0)
    if rank == 0:
        log(f"training on {world_size} worker(s), {device.type}, mixed precision {precision.mode}, "
            f"{losses.total_steps} steps")

    # Train.
    for step, epoch, batch in epochs_of_batches(ray.train.get_dataset_shard("train"), cfg, device):
        pixels, prompt_ids = join_instance_and_class(batch)
        loss = train_step(models, optimizer, precision, pixels, prompt_ids, cfg.prior_loss_weight,
                          cfg.max_grad_norm)
        losses.add(step, epoch, loss)
        if step % cfg.report_every_n_steps == 0:
            ray.train.report(losses.flush())  # a barrier across workers: hence only every N steps

    # Save: rank 0 writes the trained modules and the loss history; Ray Train persists them to
    # storage that every node (and the driver) can read.
    metrics = losses.flush()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_trained_modules(models, Path(folder))
            Path(folder, TRAINING_LOG).write_text(json.dumps({
                "raybooth_version": __version__, "mixed_precision": precision.mode, "world_size": world_size,
                "config": dataclasses.asdict(cfg), "history": losses.history}, indent=1, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def planned_steps(cfg: TrainConfig, pairs: int, world_size: int) -> int:
    rows_per_worker = pairs // world_size  # Ray Train splits the dataset into equal shards
    return min(cfg.max_train_steps, cfg.num_epochs * math.ceil(rows_per_worker / cfg.train_batch_size))


def epochs_of_batches(shard, cfg: TrainConfig, device: torch.device) -> Iterator[tuple[int, int, dict]]:
    """(step, epoch, batch) until `num_epochs` pass or `max_train_steps` are taken. Steps count from 1."""
    step = 0
    for epoch in range(cfg.num_epochs):
        for batch in shard.iter_torch_batches(batch_size=cfg.train_batch_size, device=device,
                                              local_shuffle_buffer_size=8 * cfg.train_batch_size):
            step += 1
            yield step, epoch, batch
            if step >= cfg.max_train_steps:
                return


class LossLog:
    """Per-step losses averaged over workers: the history the user sees, and the metrics each
    report carries. Losses stay on the device until a report, since reading one each step
    would make the host wait for the GPU each step."""

    def __init__(self, total_steps: int, world_size: int, verbose: bool):
        self.total_steps, self.world_size, self.verbose = total_steps, world_size, verbose
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
                self.history.append({"step": step, "epoch": epoch + 1, "loss": total,
                                     "instance_loss": instance, "prior_loss": prior})
            window = self.window = self.history[-len(self.pending):]
            elapsed = time.monotonic() - self.last_report
            self.pending, self.last_report = [], time.monotonic()
            if self.verbose:
                log(f"step {window[-1]['step']}/{self.total_steps} epoch {window[-1]['epoch']} "
                    f"loss {_mean(window, 'loss'):.4f} (instance {_mean(window, 'instance_loss'):.4f}, "
                    f"prior {_mean(window, 'prior_loss'):.4f}) {len(window) / elapsed:.2f} steps/s")
        window = self.window
        if not window:
            return {"step": 0}
        return {"step": window[-1]["step"], "epoch": window[-1]["epoch"], "loss": _mean(window, "loss"),
                "instance_loss": _mean(window, "instance_loss"), "prior_loss": _mean(window, "prior_loss")}


def _mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)
