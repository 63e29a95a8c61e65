"""The pipeline that makes images, in a Ray Data actor, in the command's own process or on a
training worker: loaded once with its sampler, dtype and attention kernels, then rendering rows of
(prompt, seed), one generator per image so that its noise depends on its own seed alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raybooth.config import GenerateConfig
from raybooth.errors import RayboothError
from raybooth.models.folders import model_family
from raybooth.models.lora import load_adapters
from raybooth.terminal.log import quiet_model_libraries


def inference_dtype(name: str, device: str):
    import torch

    from raybooth.models.loading import half_precision_dtype

    if name == "auto":
        return half_precision_dtype() if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def render(pipeline, rows: list[dict], device: str, settings: dict) -> list[np.ndarray]:
    """uint8 HWC images for `rows` (prompt, seed), as the pipeline makes them. One generator per
    image: its noise depends on its own seed, not on the batch it lands in."""
    import torch

    generators = [torch.Generator(device).manual_seed(int(row["seed"])) for row in rows]
    images = pipeline([row["prompt"] for row in rows], generator=generators, output_type="np", **settings).images
    if not np.isfinite(images).all():  # would be written as black images
        raise RayboothError("the model made non-finite values (NaN or Inf) in place of an image; its weights are "
                            "probably damaged (check them, or load the model again)")
    return list((images * 255).round().astype(np.uint8))  # as the pipeline's own conversion to PIL


def pipeline_settings(num_inference_steps: int, guidance_scale: float, resolution: int) -> dict:
    return dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=resolution,
                width=resolution)


def use_sampler(pipeline, sampler: str) -> None:
    """dpm++: DPM-Solver++ (2M) in place of the model's own scheduler, on the same noise schedule
    (its config); model: the scheduler as the model folder has it."""
    if sampler == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)


def load_pipeline(model_dir: str | Path, device: str, dtype: str, sampler: str, safety_checker: bool = True,
                  lora_weights: str | None = None, lora_scale: float = 1.0):
    """The pipeline that `raybooth generate` renders with, on `device` ("cuda" or "cpu")."""
    quiet_model_libraries()

    from raybooth.models.loading import use_flash_attention

    family = model_family(Path(model_dir))
    # Built in host memory, then moved: reading each weight straight onto the GPU (device_map)
    # loaded no faster (bench/RESULTS.md, runs AH and BD).
    pipeline = family.pipeline_class().from_pretrained(model_dir, **family.generation_options(safety_checker)).to(
        device, inference_dtype(dtype, device))
    if lora_weights:
        load_adapters(pipeline, Path(lora_weights), lora_scale)
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, sampler)
    use_flash_attention(device)
    return pipeline


def default_batch_size(use_gpu: bool) -> int:
    # Measured on an H100 at 512 px: 1.5 images/s at batch 4, 3.0 at 16, 3.1 at 32 (bench/RESULTS.md).
    return 16 if use_gpu else 4


def actor_count(cfg: GenerateConfig, use_gpu: bool, gpus: int, images: int, batch_size: int) -> int:
    """Generation actors: --num_workers, else one per GPU (or one on CPU), no more than there are batches."""
    return max(1, min(cfg.num_workers or (gpus if use_gpu else 1), math.ceil(images / batch_size)))
