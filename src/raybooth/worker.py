"""The loop each Ray Train worker runs (in Ray Train's local mode, the command's own process runs
it: launch.py): set up, train, save. Ray appears only where it adds something: the worker's
devices and rank, its datasets, and report/checkpoint.

A worker does all of its GPU's work in one process: it reads its images from Ray Data (in local
mode the command has read them) while the model loads, makes its share of the missing class images
with that model, then trains and (rank 0) writes the result. Loading the model once and starting
one set of processes is most of what makes a run short."""

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

import ray.train
import ray.train.torch
import torch

from raybooth import __version__, lora
from raybooth.batches import TrainingSet, pairing
from raybooth.checkpoint_writer import CheckpointWriter, writing_stream
from raybooth.checkpoint_folders import check_settings, read_state
from raybooth.checkpoints import restore
from raybooth.config import TrainConfig
from raybooth.data import read_worker_images, tokenize
from raybooth.errors import RayboothError
from raybooth.graphs import GraphedStep
from raybooth.launch import preloaded_models
from raybooth.log import clock_start, log, quiet_model_libraries, set_clock
from raybooth.losslog import LossLog
from raybooth.masters import train_bf16_weights
from raybooth.models import TRAINING_LOG, load_for_training, load_tokenizer, save_trained_modules, use_flash_attention
from raybooth.optim import (build_optimization, enable_gradient_checkpointing, learning_rates,
                            precompute_prompt_embeddings)
from raybooth.parallel import data_parallel, unwrap
from raybooth.sampling import WorkerSamples
from raybooth.stepping import make_step, use_cuda_graph
from raybooth.training import Precision
from raybooth.watch.monitor import RunWatch
from raybooth.worker_images import make_images_on_worker, park_vae_decoder

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
    sample_sets: list[WorkerSamples] = field(default_factory=list)  # made before or after training
    started_at: float = field(default_factory=clock_start)  # the command's: workers' lines share its clock
    settings: dict = field(default_factory=dict)  # what a resumed checkpoint must match (checkpoint_folders.fingerprint)
    resume_from: str | None = None  # a checkpoint folder to start from when Ray Train has none of this run
    logs_dir: Path | None = None  # this run's logs folder (TensorBoard, validation grids)
    progress_bars: bool = False  # whether the driver's terminal shows progress bars
    # Ray Train's local mode (the one worker in the command's process): the devices, which Ray
    # Train assigns otherwise, and the run folder that CheckpointWriter writes checkpoints to.
    local_devices: list[str] | None = None
    local_run_dir: Path | None = None

    def total_steps(self, cfg: TrainConfig) -> int:
        pairs_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        return min(cfg.max_train_steps, cfg.num_epochs * math.ceil(self.pairs_per_worker / pairs_per_step))


def train_worker(loop_config: dict) -> None:
    cfg: TrainConfig = loop_config["config"]
    plan: TrainPlan = loop_config["plan"]
    set_clock(plan.started_at)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    say = log if rank == 0 else (lambda message: None)
    say(f"{world_size} worker(s) up; loading the model")  # the time to here is Ray Train's start
    quiet_model_libraries()
    watch = RunWatch(cfg, plan, rank, say)

    # Setup. With two GPUs per worker the text encoder takes the second one.
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
    share, preloaded = plan.class_shares[rank], loop_config.get("preloaded")  # local mode's (launch.preload)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_worker_images, rank, [entry["path"] for entry in share if "path" in entry], say,
                              preloaded and preloaded.images.take)
        loading = time.monotonic()
        models = (preloaded_models(preloaded, plan)
                  or load_for_training(model_dir, device, text_encoder_device, precision.frozen_dtype,
                                       cfg.trains_text_encoder, lora=cfg.use_lora))
        say(f"model loaded on {device} in {time.monotonic() - loading:.1f} s")
        # No safety checker: the black images it returns for flagged samples would teach the prior.
        made = make_images_on_worker(models, model_dir, [entry for entry in share if "file" in entry],
                                     Path(plan.class_images_dir), cfg, plan.resolution, "class images", say,
                                     bar=plan.progress_bars and rank == 0)
        tokenizer = load_tokenizer(model_dir)
        instance_images, class_images = reading.result()
    training_set = TrainingSet(
        instance_images, class_images + made, plan.resolution,
        pairing(len(instance_images), len(class_images) + len(made), plan.pairs_per_worker, rank, world_size),
        cfg.train_batch_size, tokenize(tokenizer, cfg.instance_prompt, cfg.tokenizer_max_length),
        tokenize(tokenizer, cfg.class_prompt, cfg.tokenizer_max_length), device, cfg.seed + rank,
        accumulation=cfg.gradient_accumulation_steps, center_crop=cfg.center_crop, random_flip=cfg.random_flip)
    training_set.encode_ahead(models.vae, plan.total_steps(cfg), say)
    make_samples(plan, rank, models, cfg, say, before_training=True)  # the pretrained model's
    park_vae_decoder(models)  # on a GPU, in host memory: steps only encode; images made later bring it back
    if cfg.use_lora:  # after the class images and samples, which come from the base model
        lora.add_to_models(models, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    if cfg.pre_compute_text_embeddings:
        training_set.prompt_embeds = precompute_prompt_embeddings(models, training_set.prompt_ids, precision)
        say("prompts encoded once; the text encoder is freed")
    channels_last = cfg.uses_channels_last(device.type, world_size)
    if channels_last:  # after the class images and samples, whose sampling it slows (bench/RESULTS.md)
        models.unet.to(memory_format=torch.channels_last)
    if cfg.uses_bf16_gradients(precision.mode, world_size):  # before DDP, whose buckets take the weights' dtype
        train_bf16_weights(models, precision)
    graph = use_cuda_graph(cfg, precision, device, text_encoder_device, say)
    graph_stream = torch.cuda.Stream(device) if graph else None
    if graph and training_set.crop_latents is not None:  # new crops encoded beside the graphed step
        training_set.crop_latents.stream = torch.cuda.Stream(device)
    if world_size > 1:
        models = data_parallel(models, graph_stream, cfg.ddp_bucket_mb)
    optimization = build_optimization(models, cfg, plan.total_steps(cfg), world_size, lr_as_tensor=graph)
    step = make_step(models, optimization.optimizer, precision, cfg, graph_stream, world_size, training_set.encodes_in_step)
    images_per_step = 2 * cfg.train_batch_size * cfg.gradient_accumulation_steps * world_size
    losses = LossLog(plan.total_steps(cfg), world_size, images_per_step, verbose=rank == 0,
                     optimizer=optimization.optimizer, board=watch.board)
    first_step, position = resume(plan, rank, models, optimization, losses, say)
    levers = {"bf16 weights over fp32 masters": models.masters is not None, "channels-last UNet": channels_last,
              "cuDNN attention": cfg.uses_cudnn_attention(device.type), "CUDA graph": isinstance(step, GraphedStep),
              "compiled by Inductor (the first step compiles: minutes, unless cached)": cfg.compile}
    say(f"training on {world_size} worker(s), {device.type}, mixed precision {precision.mode}, "
        f"{''.join(f'{lever}, ' for lever, on in levers.items() if on)}{losses.total_steps} steps")
    checkpoints = CheckpointWriter(rank, plan.settings, say, plan.local_run_dir, cfg.checkpoints_total_limit)
    watch.mark("setup")

    # Train.
    for step_number, epoch, batch in training_set.batches(cfg.num_epochs, cfg.max_train_steps, first_step, position):
        losses.add(step_number, epoch, step(batch))
        optimization.after_step()  # the learning rate (and EMA) for the next step
        if step_number == first_step + 1:
            say(f"first step done, loss {losses.pending[-1][2][0].item():.4f}")
        if step_number % cfg.checkpointing_steps == 0 and step_number < losses.total_steps:
            checkpoints.save(models, optimization, losses.flush(), losses.history, training_set.position(), step_number)
        elif step_number % cfg.report_every_n_steps == 0:
            metrics = losses.flush()  # the loss averaged over workers, and the progress line
            if not checkpoints.writing():  # Ray Train keeps reports in order: this one would wait for the write
                ray.train.report(metrics)  # a barrier across workers: hence only every N steps
        watch.after_step(step_number, models, losses)  # rank 0: a validation grid when one is due

    # Save: rank 0 writes the trained modules and the loss history into the output's partial
    # folder when it can see it (same node, or shared storage); otherwise Ray Train carries them
    # to storage as a checkpoint and the driver copies them from there. The samples are made from
    # the tuned model meanwhile: their pipeline holds copies of the weights that are written.
    metrics = losses.flush()
    watch.mark("train")
    say("training done; saving")
    optimization.finish()  # the UNet takes the EMA weights (--use_ema), the modules their fp32 masters
    if channels_last:  # safetensors writes contiguous tensors only, and the samples run faster in them
        unwrap(models.unet).to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(1) as saver:
        folder = Path(plan.output_partial) if rank == 0 and sees_output(plan) else Path(scratch)
        saving = (saver.submit(save_output, models, folder, cfg, plan,
                               training_log(cfg, precision, world_size, models, losses, channels_last))
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


def save_output(models, folder: Path, cfg: TrainConfig, plan: TrainPlan, history: dict) -> None:
    """Rank 0's output: the trained modules (or the LoRA adapter) and the training log. Run beside
    the samples, so its copies to the host go on a stream of their own."""
    with writing_stream(models.device):
        if cfg.use_lora:
            lora.save_output(models, folder, cfg, Path(plan.model_dir), plan.resolution)
        else:
            save_trained_modules(models, folder)
    Path(folder, TRAINING_LOG).write_text(json.dumps(history, indent=1, default=str))


def training_log(cfg: TrainConfig, precision: Precision, world_size: int, models, losses: LossLog,
                 channels_last: bool) -> dict:
    """What TRAINING_LOG holds beside the weights: the run's settings and its loss history."""
    return {"raybooth_version": __version__, "mixed_precision": precision.mode, "world_size": world_size,
            "bf16_gradients": models.masters is not None,  # as the run trained, decided once at set-up
            "channels_last": channels_last,
            "learning_rate": learning_rates(cfg, world_size)[0], "config": dataclasses.asdict(cfg),
            "history": losses.history}


def make_samples(plan: TrainPlan, rank: int, models, cfg: TrainConfig, say, before_training: bool) -> bool:
    """This worker's share of the sample sets due now, from the model in memory; whether any were."""
    due = [samples for samples in plan.sample_sets if samples.before_training == before_training]
    for samples in due:
        make_images_on_worker(models, Path(plan.model_dir), samples.shares[rank], Path(samples.folder), cfg,
                              plan.resolution, samples.what, say, safety_checker=samples.safety_checker,
                              bar=plan.progress_bars and rank == 0)
    return bool(due)


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


def sees_output(plan: TrainPlan) -> bool:
    token = Path(plan.output_partial, OUTPUT_TOKEN)
    return token.is_file() and token.read_text() == plan.output_token
