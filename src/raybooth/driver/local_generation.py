"""`raybooth generate` in the command's own process, without Ray: where one actor would render on a
Ray this command would start, the pipeline renders here and a few processes of our own encode and
write the PNGs. Ray adds nothing to one pipeline on this machine but its start, which ran beside
the pipeline's load and slowed it (6-13 s on an H100 machine, bench/RESULTS.md); a Ray Data actor
is a fresh process besides, which starts only once Ray is up, then imports torch and diffusers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from raybooth.config import GenerateConfig
from raybooth.config.fields import inference_steps
from raybooth.driver.cluster import cpus_per_worker, ray_started_here
from raybooth.driver.launch import as_a_worker
from raybooth.errors import RayboothError
from raybooth.generate.on_worker import render_and_write, write_pngs
from raybooth.generate.pipelines import actor_count, default_batch_size, load_pipeline, pipeline_settings
from raybooth.terminal.log import log
from raybooth.terminal.progress import ImageProgress

PNG_WRITERS_ON_GPU = 2  # a GPU renders 6-7 images/s at 512 px; encoding one takes about 0.15 s


def uses_local_mode(cfg: GenerateConfig, started_here: bool, actors: int) -> bool:
    """As --local_mode says, else where one actor would render, on a Ray this command would
    start (on a cluster the command's own machine may have no GPU)."""
    if cfg.local_mode is not None:
        return cfg.local_mode
    return started_here and actors == 1


def local_device(cfg: GenerateConfig, images: int) -> str | None:
    """"cuda" or "cpu" where generation renders in this process, as --local_mode says (by default:
    where one actor would render, on a Ray this command would start); None where Ray Data's actors
    render. The GPUs are counted by torch, as a Ray started here would count them."""
    started_here = ray_started_here(cfg.address)
    if not uses_local_mode(cfg, started_here, actors=1):  # not even where one actor would render
        return None
    import torch

    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not torch.cuda.is_available():
        raise RayboothError("--use_gpu was given but torch sees no GPU on this machine")
    batch_size = cfg.batch_size or default_batch_size(use_gpu)
    actors = actor_count(cfg, use_gpu, torch.cuda.device_count(), images, batch_size)
    return ("cuda" if use_gpu else "cpu") if uses_local_mode(cfg, started_here, actors) else None


def png_writers(device: str) -> ProcessPoolExecutor:
    """Processes that encode and write PNGs, started now (each imports numpy and Pillow only) so
    that they are up by the first batch. Spawned, not forked: this process may hold a CUDA context.
    They ignore Ctrl-C, which a terminal sends to each of the command's processes: the writes in
    flight finish, and the pool's shutdown, as the command stops, waits for them."""
    count = PNG_WRITERS_ON_GPU if device == "cuda" else 1
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))
    for _ in range(count):
        pool.submit(write_pngs, "", [], [])  # writes nothing; starts a process
    return pool


def generate_here(cfg: GenerateConfig, model_dir: Path, lora_weights: str | None, device: str, resolution: int,
                  todo: list[dict], batch_size: int, progress: ImageProgress) -> None:
    """`todo`'s images from a pipeline in this process, as an actor would make them (its CPU
    threads too: a seed gives the same image either way). Only the render holds the pipeline, so
    it goes, and its GPU memory, once the images are written."""
    settings = pipeline_settings(inference_steps(cfg.sampler, cfg.num_inference_steps), cfg.guidance_scale, resolution)
    threads = None if device == "cuda" else cpus_per_worker(1, False, os.cpu_count() or 1)  # as Ray counts them
    with png_writers(device) as pool, as_a_worker(threads):
        render_and_write(pipeline_for(cfg, model_dir, lora_weights, device), todo, Path(cfg.output_dir), batch_size,
                         settings, progress, partial(pool.submit, write_pngs))


def pipeline_for(cfg: GenerateConfig, model_dir: Path, lora_weights: str | None, device: str):
    """The pipeline, loaded with a line that says how long that took (imports included: on a GPU
    machine most of the wait for the first image)."""
    started = time.monotonic()
    pipeline = load_pipeline(model_dir, device, cfg.dtype, cfg.sampler, cfg.safety_checker, lora_weights,
                             cfg.lora_scale)
    log(f"pipeline loaded on {device} in {time.monotonic() - started:.1f} s")
    return pipeline
