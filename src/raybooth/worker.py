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

from raybooth import __version__, lora
from raybooth.batches import TrainingSet, pairing
from raybooth.checkpoints import check_settings, checkpoint_name, read_state, restore, write_checkpoint
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
    settings: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed (checkpoints.fingerprint)
    resume_from: str | None = None  # a checkpoint folder to start from when Ray Train has none of this run

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
                                   cfg.trains_text_encoder, lora=cfg.use_lora)
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
    if cfg.use_lora:  # after the class images, which come from the base model
        lora.add_to_models(models, cfg)
    graph = use_cuda_graph(cfg, precision, device, text_encoder_device)
    graph_stream = torch.cuda.Stream(device) if graph else None
    if world_size > 1:
        models = models.data_parallel(graph_stream)
    optimizer = make_optimizer(models.trainable_parameters(), cfg.learning_rate())
    step = make_step(models, optimizer, precision, cfg, graph_stream, world_size)
    losses = LossLog(plan.total_steps(cfg), world_size, 2 * cfg.train_batch_size * world_size, verbose=rank == 0)
    first_step, position = resume(plan, rank, models, optimizer, losses, say)
    say(f"training on {world_size} worker(s), {device.type}, mixed precision {precision.mode}, "
        f"{'CUDA graph, ' if isinstance(step, GraphedStep) else ''}{losses.total_steps} steps")

    # Train.
    for step_number, epoch, batch in training_set.batches(cfg.num_epochs, cfg.max_train_steps, first_step, position):
        losses.add(step_number, epoch, step(batch))
        if step_number == first_step + 1:
            say(f"first step done, loss {losses.pending[-1][2][0].item():.4f}")
        if step_number % cfg.checkpointing_steps == 0 and step_number < losses.total_steps:
            save_checkpoint(plan, rank, models, optimizer, losses, training_set.position(), step_number, say)
        elif step_number % cfg.report_every_n_steps == 0:
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
            if cfg.use_lora:
                lora.save_output(models, folder, cfg, model_dir, plan.resolution)
            else:
                save_trained_modules(models, folder)
            Path(folder, TRAINING_LOG).write_text(json.dumps({
                "raybooth_version": __version__, "mixed_precision": precision.mode, "world_size": world_size,
                "learning_rate": cfg.learning_rate(), "config": dataclasses.asdict(cfg), "history": losses.history}, indent=1, default=str))
            checkpoint = None if direct else ray.train.Checkpoint.from_directory(scratch)
        say("saved")
        # Samples from the tuned model while it is in memory: each worker makes its share.
        if plan.sample_shares:
            make_images_on_worker(models, model_dir, plan.sample_shares[rank], Path(plan.samples_dir), cfg,
                                  plan.resolution, "samples", say, safety_checker=True)
        ray.train.report(metrics, checkpoint=checkpoint)


def resume(plan: TrainPlan, rank: int, models, optimizer, losses: LossLog, say) -> tuple[int, dict | None]:
    """(steps already taken, data position) from the run's latest checkpoint, which Ray Train
    hands over after a worker or node was lost or when the same command runs again, else from
    the plan's; (0, None) for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and plan.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(plan.resume_from)
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as folder:
        if read_state(Path(folder)) is None:  # a finished run's final weights: nothing to continue
            return 0, None
        check_settings(Path(folder), plan.settings)
        step, losses.history, position = restore(Path(folder), rank, models, optimizer)
    say(f"resumed at step {step} from the checkpoint {checkpoint.path}")
    return step, position


def save_checkpoint(plan: TrainPlan, rank: int, models, optimizer, losses: LossLog, position: dict, step: int,
                    say) -> None:
    """Write the state locally, then let Ray Train upload it in the background: training waits
    only for the write."""
    metrics = losses.flush()
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="raybooth-checkpoint-")
    write_checkpoint(Path(folder), rank, models, optimizer, step, losses.history, position, plan.settings)
    say(f"checkpoint at step {step} written in {time.monotonic() - started:.1f} s")
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=checkpoint_name(step),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


def read_images(rank: int, class_paths: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All instance images, and this worker's class images, in the plan's order."""
    instance = read_all(ray.train.get_dataset_shard("instance"))
    by_path = read_all(ray.train.get_dataset_shard(f"class_{rank}")) if class_paths else {}
    return [instance[path] for path in sorted(instance)], [by_path[path] for path in class_paths]


def use_cuda_graph(cfg: TrainConfig, precision: Precision, device: torch.device,
                   text_encoder_device: torch.device) -> bool:
    """Graphs need one device per worker (no cross-GPU text encoder) and no loss scaler (fp16)."""
    return cfg.cuda_graphs and device.type == "cuda" and text_encoder_device == device and precision.scaler is None


# DDP settles its gradient buckets over its first iterations; PyTorch asks for 11 eager ones
# before a step with DDP's all-reduce in it is captured.
DDP_GRAPH_WARMUP_STEPS = 11


def make_step(models, optimizer, precision: Precision, cfg: TrainConfig, graph_stream: torch.cuda.Stream | None,
              world_size: int):
    """The step as called in the loop: a CUDA graph captured on `graph_stream`, or eager without one."""
    def step(batch):
        return train_step(models, optimizer, precision, batch, cfg.prior_loss_weight, cfg.max_grad_norm)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    if graph_stream is not None:
        return GraphedStep(step, zero_grad, DDP_GRAPH_WARMUP_STEPS if world_size > 1 else 3, graph_stream)
    return lambda batch: (step(batch), zero_grad())[0]


def sees_output(plan: TrainPlan) -> bool:
    token = Path(plan.output_partial, OUTPUT_TOKEN)
    return token.is_file() and token.read_text() == plan.output_token
