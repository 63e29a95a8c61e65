"""The loop each Ray Train worker runs (in Ray Train's local mode, the command's own process runs
it): set up, train, save, top to bottom. Ray appears only where it adds something: the worker's
devices and rank, its datasets, and report/checkpoint.

A worker does all of its GPU's work in one process: it reads its images from Ray Data (in local
mode the command has read them) while the model loads, makes its share of the missing class images
with that model, then trains and (rank 0) writes the result. Loading the model once and starting
one set of processes is most of what makes a run short."""

from __future__ import annotations

import functools
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.train
import ray.train.torch
import torch

from raybooth.config import TrainConfig
from raybooth.errors import RayboothError
from raybooth.generate.on_worker import make_images_on_worker, park_vae_decoder
from raybooth.models import lora
from raybooth.models.folders import model_family
from raybooth.models.loading import load_for_training, load_tokenizers, prompt_ids, use_flash_attention
from raybooth.models.modules import DreamBoothModels, unwrap
from raybooth.terminal.log import log, quiet_model_libraries, set_clock
from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.checkpoint_writer import CheckpointWriter
from raybooth.train.checkpoints import resume
from raybooth.train.data import read_worker_images
from raybooth.train.finish import make_samples, save_output, sees_output, training_log
from raybooth.train.graphs import GraphedStep
from raybooth.train.losslog import LossLog
from raybooth.train.masters import train_bf16_weights
from raybooth.train.optim import (Optimization, build_optimization, enable_gradient_checkpointing,
                                  precompute_prompt_embeddings)
from raybooth.train.parallel import data_parallel
from raybooth.train.plan import TrainPlan
from raybooth.train.policy import uses_bf16_gradients, uses_channels_last, uses_cudnn_attention
from raybooth.train.precision import Precision
from raybooth.train.preload import Preloaded, preloaded_models
from raybooth.train.step import make_step, use_cuda_graph
from raybooth.watch.monitor import RunWatch


def train_worker(loop_config: dict) -> None:
    """What Ray Train runs on each worker: the plan's loop, set up, trained, saved."""
    worker = set_up(loop_config["plan"], loop_config.get("preloaded"))  # preloaded: local mode's (driver/preload.py)
    metrics = train(worker)
    save(worker, metrics)


@dataclass
class Worker:
    """One worker's state once set up: what `train` steps and `save` writes."""

    plan: TrainPlan
    rank: int
    world_size: int
    say: Callable[[str], None]  # rank 0's lines; the other ranks say nothing
    watch: RunWatch
    precision: Precision
    models: DreamBoothModels
    training_set: TrainingSet
    optimization: Optimization
    step: Callable
    losses: LossLog
    checkpoints: CheckpointWriter
    channels_last: bool
    first_step: int  # steps already taken (a resumed run)
    position: dict | None  # where in its data a resumed run goes on

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.config


def set_up(plan: TrainPlan, preloaded: Preloaded | None) -> Worker:
    """Devices, models and images; this worker's share of the class images, made with the model it
    loaded; then every lever the step takes, in the order each needs (adapters before DDP, bf16
    weights before DDP's buckets, the CUDA graph's stream before both)."""
    cfg = plan.config
    set_clock(plan.started_at)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    say = log if rank == 0 else (lambda message: None)
    say(f"{world_size} worker(s) up; loading the model")  # the time to here is Ray Train's start
    quiet_model_libraries()
    watch = RunWatch(cfg, plan, rank, say)

    # With two GPUs per worker the text encoder takes the second one.
    devices = ([torch.device(name) for name in plan.local_devices] if plan.local_devices
               else ray.train.torch.get_devices())
    device, text_encoder_device = devices[0], devices[-1]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_flash_attention(device)  # for the class images too, as `raybooth generate` makes them
    torch.manual_seed(cfg.seed + rank)  # each worker draws its own noise and timesteps
    precision = Precision(cfg.mixed_precision, device)
    model_dir = Path(plan.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise RayboothError(f"{model_dir} is not readable on {socket.gethostname()}: on several nodes, keep "
                            "the model on storage that every node shares")
    share = plan.class_shares[rank]
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_worker_images, rank, [entry["path"] for entry in share if "path" in entry], say,
                              preloaded and preloaded.images.take)
        loading = time.monotonic()
        models = (preloaded_models(preloaded, plan)
                  or load_for_training(model_dir, device, text_encoder_device, precision.frozen_dtype,
                                       cfg.trains_text_encoder, cfg.use_lora, cfg.pretrained_vae_model_name_or_path))
        say(f"model loaded on {device} in {time.monotonic() - loading:.1f} s")
        # No safety checker: the black images it returns for flagged samples would teach the prior.
        made = make_images_on_worker(models, model_dir, [entry for entry in share if "file" in entry],
                                     Path(plan.class_images_dir), cfg, plan.resolution, "class images", say,
                                     bar=plan.progress_bars and rank == 0)
        tokenizers = load_tokenizers(model_dir)
        instance_images, class_images = reading.result()
    tokenized = functools.cache(lambda prompt: prompt_ids(tokenizers, prompt, cfg.tokenizer_max_length))
    training_set = TrainingSet(
        instance_images, class_images + made, plan.resolution,
        pairing(len(instance_images), len(class_images) + len(made), plan.pairs_per_worker, rank, world_size),
        cfg.train_batch_size, tokenized(cfg.instance_prompt), tokenized(cfg.class_prompt), device, cfg.seed + rank,
        accumulation=cfg.gradient_accumulation_steps, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
        original_sizes=plan.original_sizes() if model_family(model_dir).micro_conditioning else None,
        photo_prompt_ids=[tokenized(prompt) for prompt in plan.photo_prompts()])  # captions: files/captions.py
    training_set.encode_ahead(models.vae, plan.total_steps(), say)
    make_samples(plan, rank, models, cfg, say, before_training=True)  # the pretrained model's
    park_vae_decoder(models)  # on a GPU, in host memory: steps only encode; images made later bring it back
    if cfg.use_lora:  # after the class images and samples, which come from the base model
        lora.add_to_models(models, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    if cfg.pre_compute_text_embeddings:
        encoded = training_set.prompts.encode_once(lambda ids: precompute_prompt_embeddings(models, ids, precision))
        say(f"the {encoded} distinct prompts encoded once; the text encoders are freed")
    channels_last = uses_channels_last(cfg, device.type, world_size)
    if channels_last:  # after the class images and samples, whose sampling it slows (bench/RESULTS.md)
        models.unet.to(memory_format=torch.channels_last)
    if uses_bf16_gradients(cfg, precision.mode, world_size):  # before DDP, whose buckets take the weights' dtype
        train_bf16_weights(models, precision)
    graph = use_cuda_graph(cfg, precision, device, text_encoder_device, say)
    graph_stream = torch.cuda.Stream(device) if graph else None
    if graph and training_set.crop_latents is not None:  # new crops encoded beside the graphed step
        training_set.crop_latents.stream = torch.cuda.Stream(device)
    if world_size > 1:
        models = data_parallel(models, graph_stream, cfg.ddp_bucket_mb)
    optimization = build_optimization(models, cfg, plan.total_steps(), world_size, lr_as_tensor=graph)
    step = make_step(models, optimization.optimizer, precision, cfg, graph_stream, world_size, training_set.encodes_in_step)
    images_per_step = 2 * cfg.train_batch_size * cfg.gradient_accumulation_steps * world_size
    losses = LossLog(plan.total_steps(), world_size, images_per_step, verbose=rank == 0,
                     optimizer=optimization.optimizer, board=watch.board)
    first_step, position = resume(plan, rank, models, optimization, losses, say)
    levers = {"bf16 weights over fp32 masters": models.masters is not None, "channels-last UNet": channels_last,
              "cuDNN attention": uses_cudnn_attention(cfg, device.type), "CUDA graph": isinstance(step, GraphedStep),
              "compiled by Inductor (the first step compiles: minutes, unless cached)": cfg.compile}
    say(f"training on {world_size} worker(s), {device.type}, mixed precision {precision.mode}, "
        f"{''.join(f'{lever}, ' for lever, on in levers.items() if on)}{losses.total_steps} steps")
    checkpoints = CheckpointWriter(rank, plan.settings, say, plan.local_run_dir, cfg.checkpoints_total_limit,
                                   plan.flags)
    watch.mark("setup")
    return Worker(plan, rank, world_size, say, watch, precision, models, training_set, optimization, step, losses,
                  checkpoints, channels_last, first_step, position)


def train(worker: Worker) -> dict:
    """The steps, from where a resumed run left off; checkpoints and reports on their schedule.
    Returns the last report's metrics."""
    cfg, losses, step, optimization = worker.cfg, worker.losses, worker.step, worker.optimization
    batches = worker.training_set.batches(cfg.num_epochs, cfg.max_train_steps, worker.first_step, worker.position)
    for step_number, epoch, batch in batches:
        losses.add(step_number, epoch, step(batch))
        optimization.after_step()  # the learning rate (and EMA) for the next step
        if step_number == worker.first_step + 1:
            worker.say(f"first step done, loss {losses.pending[-1][2][0].item():.4f}")
        if step_number % cfg.checkpointing_steps == 0 and step_number < losses.total_steps:
            worker.checkpoints.save(worker.models, optimization, losses.flush(), losses.history,
                                   worker.training_set.position(), step_number)
        elif step_number % cfg.report_every_n_steps == 0:
            metrics = losses.flush()  # the loss averaged over workers, and the progress line
            # Ray Train keeps reports in order: this one would wait for a checkpoint being written.
            if not worker.checkpoints.writing():
                ray.train.report(metrics)  # a barrier across workers: hence only every N steps
        worker.watch.after_step(step_number, worker.models, losses)  # rank 0: a validation grid when one is due
    metrics = losses.flush()
    worker.watch.mark("train")
    return metrics


def save(worker: Worker, metrics: dict) -> None:
    """Rank 0 writes the trained modules and the loss history into the output's partial folder
    when it can see it (same node, or shared storage); otherwise Ray Train carries them to storage
    as a checkpoint and the driver copies them from there. The samples are made from the tuned
    model meanwhile: their pipeline holds copies of the weights that are written."""
    plan, cfg, rank, say, models, watch = worker.plan, worker.cfg, worker.rank, worker.say, worker.models, worker.watch
    losses, checkpoints, channels_last = worker.losses, worker.checkpoints, worker.channels_last
    say("training done; saving")
    worker.optimization.finish()  # the UNet takes the EMA weights (--use_ema), the modules their fp32 masters
    if channels_last:  # safetensors writes contiguous tensors only, and the samples run faster in them
        unwrap(models.unet).to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(1) as saver:
        folder = Path(plan.output_partial) if rank == 0 and sees_output(plan) else Path(scratch)
        saving = (saver.submit(save_output, models, folder, cfg, plan,
                               training_log(cfg, worker.precision, worker.world_size, models, losses, channels_last))
                  if rank == 0 else None)
        if make_samples(plan, rank, models, cfg, say, before_training=False):  # each worker makes its share
            watch.mark("samples")
        if saving is not None:
            saving.result()
        say("saved")
        watch.mark("save")
        checkpoint = ray.train.Checkpoint.from_directory(scratch) if rank == 0 and folder == Path(scratch) else None
        watch.finish(metrics, losses.images_per_step, folder if rank == 0 else None)  # beside the training log
        checkpoints.wait()
        ray.train.report(metrics, checkpoint=checkpoint)
