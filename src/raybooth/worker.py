"""The loop each Ray Train worker runs: set up, train, save. Ray appears only where it adds
something: the worker's devices and rank, its datasets, and report/checkpoint.

A worker does all of its GPU's work in one process: it reads its images from Ray Data while the
model loads, makes its share of the missing class images with that model, then trains and (rank
0) writes the result. Loading the model once and starting one set of processes is most of what
makes a run short.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from raybooth import __version__
from raybooth.batches import TrainingSet, pairing
from raybooth.config import TrainConfig
from raybooth.data import read_all, tokenize
from raybooth.errors import RayboothError
from raybooth.generate import make_images_on_worker
from raybooth.graphs import GraphedStep
from raybooth.log import log, quiet_model_libraries, set_clock
from raybooth.losslog import LossLog
from raybooth.models import TRAINING_LOG, load_for_training, load_tokenizer, save_trained_modules
from raybooth.training import Precision, make_optimizer, train_step

OUTPUT_TOKEN = ".raybooth-output"  # in the output's partial folder: rank 0 writes there if it sees it


@dataclass
class TrainPlan:
    """What the driver decided, for every worker alike."""

    model_dir: Path
    resolution: int
    class_images_dir: Path
    class_shares: list[list[dict]]  # per worker: {"path"} to read, or {"prompt", "seed", "file"} to make
    pairs_per_worker: int
    output_partial: str
    output_token: str
    samples_dir: Path | None = None
    sample_shares: list[list[dict]] = field(default_factory=list)  # per worker: {"prompt", "seed", "file"}
    started_at: float = field(default_factory=time.time)

    def total_steps(self, cfg: TrainConfig) -> int:
        return min(cfg.max_train_steps, cfg.num_epochs * math.ceil(self.pairs_per_worker / cfg.train_batch_size))


def train_worker(loop_config: dict) -> None:
    cfg: TrainConfig = loop_config["config"]
    plan: TrainPlan = loop_config["plan"]
    set_clock(plan.started_at)
    quiet_model_libraries()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    say = log if rank == 0 else (lambda message: None)

    # Setup. With two GPUs per worker the text encoder takes the second one.
    devices = ray.train.torch.get_devices()
    device, text_encoder_device = devices[0], devices[-1]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)  # each worker draws its own noise and timesteps
    precision = Precision(cfg.mixed_precision, device)
    model_dir = Path(plan.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise RayboothError(f"{model_dir} is not readable on {socket.gethostname()}: on several nodes, keep "
                            "the model on storage that every node shares")
    share = plan.class_shares[rank]
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_images, rank, [entry["path"] for entry in share if "path" in entry])
        models = load_for_training(model_dir, device, text_encoder_device, precision.frozen_dtype,
                                   cfg.train_text_encoder)
        say(f"model loaded on {device}")
        # No safety checker: the black images it returns for flagged samples would teach the prior.
        made = make_images_on_worker(models, model_dir, [entry for entry in share if "file" in entry],
                                     Path(plan.class_images_dir), cfg, plan.resolution, "class images", say)
        tokenizer = load_tokenizer(model_dir)
        instance_images, class_images = reading.result()
    training_set = TrainingSet(
        instance_images, class_images + made, plan.resolution,
        pairing(len(instance_images), len(class_images) + len(made), plan.pairs_per_worker, rank, world_size),
        cfg.train_batch_size, tokenize(tokenizer, cfg.instance_prompt), tokenize(tokenizer, cfg.class_prompt), device,
        cfg.seed + rank)
    if training_set.cache_class_latents(models.vae):
        say("class images encoded once: they are at the training resolution")
    if world_size > 1:
        models = models.data_parallel()
    optimizer = make_optimizer(models.trainable_parameters(), cfg.lr)
    step = make_step(models, optimizer, precision, cfg, graph=use_cuda_graph(cfg, precision, device,
                                                                             text_encoder_device, world_size))
    losses = LossLog(plan.total_steps(cfg), world_size, 2 * cfg.train_batch_size * world_size, verbose=rank == 0)
    say(f"training on {world_size} worker(s), {device.type}, mixed precision {precision.mode}, "
        f"{'CUDA graph, ' if isinstance(step, GraphedStep) else ''}{losses.total_steps} steps")

    # Train.
    for step_number, epoch, batch in training_set.batches(cfg.num_epochs, cfg.max_train_steps):
        losses.add(step_number, epoch, step(batch))
        if step_number == 1:
            say(f"first step done, loss {losses.pending[-1][2][0].item():.4f}")
        if step_number % cfg.report_every_n_steps == 0:
            ray.train.report(losses.flush())  # a barrier across workers: hence only every N steps

    # Save: rank 0 writes the trained modules and the loss history into the output's partial
    # folder when it can see it (same node, or shared storage); otherwise Ray Train carries them
    # to storage as a checkpoint and the driver copies them from there.
    metrics = losses.flush()
    say("training done; saving")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if rank == 0:
            direct = sees_output(plan)
            folder = Path(plan.output_partial) if direct else Path(scratch)
            save_trained_modules(models, folder)
            Path(folder, TRAINING_LOG).write_text(json.dumps({
                "raybooth_version": __version__, "mixed_precision": precision.mode, "world_size": world_size,
                "config": dataclasses.asdict(cfg), "history": losses.history}, indent=1, default=str))
            checkpoint = None if direct else ray.train.Checkpoint.from_directory(scratch)
        say("saved")
        # Samples from the tuned model while it is in memory: each worker makes its share.
        if plan.sample_shares:
            make_images_on_worker(models, model_dir, plan.sample_shares[rank], Path(plan.samples_dir), cfg,
                                  plan.resolution, "samples", say, safety_checker=True)
        ray.train.report(metrics, checkpoint=checkpoint)


def read_images(rank: int, class_paths: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All instance images, and this worker's class images, in the plan's order."""
    instance = read_all(ray.train.get_dataset_shard("instance"))
    by_path = read_all(ray.train.get_dataset_shard(f"class_{rank}")) if class_paths else {}
    return [instance[path] for path in sorted(instance)], [by_path[path] for path in class_paths]


def use_cuda_graph(cfg: TrainConfig, precision: Precision, device: torch.device, text_encoder_device: torch.device,
                   world_size: int) -> bool:
    """Graphs need one device (no cross-GPU text encoder), no loss scaler (fp16), and, here, no DDP."""
    return (cfg.cuda_graphs and device.type == "cuda" and text_encoder_device == device
            and precision.scaler is None and world_size == 1)


def make_step(models, optimizer, precision: Precision, cfg: TrainConfig, graph: bool):
    def step(batch):
        return train_step(models, optimizer, precision, batch, cfg.prior_loss_weight, cfg.max_grad_norm)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    if graph:
        return GraphedStep(step, zero_grad)
    return lambda batch: (step(batch), zero_grad())[0]


def sees_output(plan: TrainPlan) -> bool:
    token = Path(plan.output_partial, OUTPUT_TOKEN)
    return token.is_file() and token.read_text() == plan.output_token
