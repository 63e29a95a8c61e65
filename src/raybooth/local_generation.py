"""`raybooth generate` in the command's own process, as training's local mode: where one actor
would render on a Ray this command starts, the pipeline loads while Ray starts and renders here,
and Ray's tasks encode and write the PNGs. A Ray Data actor is a fresh process that starts only
once Ray is up, then imports torch and diffusers and loads the pipeline: on an H100 the first
images came 32 s after the command's start (bench/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

from raybooth.cluster import cpus_per_worker, ray_started_here
from raybooth.config import GenerateConfig
from raybooth.config.fields import inference_steps
from raybooth.generate import actor_count, default_batch_size, load_pipeline, pipeline_settings
from raybooth.launch import Preloading, as_a_worker
from raybooth.watch.progress import ImageProgress
from raybooth.worker_images import render_and_write, start_png_writer


def preload_pipeline(cfg: GenerateConfig, model_dir: Path, lora_weights: str | None, images: int
                     ) -> Preloading | None:
    """Where generation will be in local mode, the pipeline starts loading now, before Ray starts:
    (device, pipeline), or (None, None) where torch sees GPUs for several actors. The device is
    guessed from torch (Ray has not counted the GPUs yet): it loads anew if Ray counts otherwise."""
    if cfg.local_mode is False or not (cfg.local_mode or ray_started_here(cfg.address)):
        return None

    def load():
        import torch

        use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
        batch_size = cfg.batch_size or default_batch_size(use_gpu)
        if not cfg.uses_local_mode(True, actor_count(cfg, use_gpu, torch.cuda.device_count(), images, batch_size)):
            return None, None  # Ray Data's actors will render
        device = "cuda" if use_gpu else "cpu"
        return device, load_for(cfg, model_dir, lora_weights, device)

    return Preloading(load)


def load_for(cfg: GenerateConfig, model_dir: Path, lora_weights: str | None, device: str):
    return load_pipeline(model_dir, device, cfg.dtype, cfg.sampler, cfg.safety_checker, lora_weights, cfg.lora_scale)


def pipeline_on(device: str, preloaded: Preloading | None, cfg: GenerateConfig, model_dir: Path,
                lora_weights: str | None):
    """The preloaded pipeline where it sits on `device`, else one loaded now."""
    loaded_on, pipeline = preloaded.take() if preloaded else (None, None)
    return pipeline if loaded_on == device else load_for(cfg, model_dir, lora_weights, device)


def generate_here(preloaded: Preloading | None, cfg: GenerateConfig, model_dir: Path, lora_weights: str | None,
                  use_gpu: bool, resolution: int, todo: list[dict], batch_size: int, progress: ImageProgress) -> None:
    """`todo`'s images from a pipeline in this process, as an actor would make them (its CPU
    threads too: a seed gives the same image either way). Only the render holds the pipeline, so
    it goes, and its GPU memory, once the images are written."""
    device = "cuda" if use_gpu else "cpu"
    start_png_writer(Path(cfg.output_dir))
    settings = pipeline_settings(inference_steps(cfg.sampler, cfg.num_inference_steps), cfg.guidance_scale, resolution)
    with as_a_worker(None if use_gpu else cpus_per_worker(1, use_gpu)):
        render_and_write(pipeline_on(device, preloaded, cfg, model_dir, lora_weights), todo, Path(cfg.output_dir),
                         batch_size, settings, progress)
