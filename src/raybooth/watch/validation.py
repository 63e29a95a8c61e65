"""Validation grids: --num_validation_images samples of --validation_prompt from the model being
trained, made on rank 0 between steps. The same seeds every time, so that grids over a run differ
by what the model learned alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from raybooth.files.names import image_seed
from raybooth.generate.on_worker import decoder_on_device, pipeline_from_models
from raybooth.generate.pipelines import default_batch_size, pipeline_settings, render


def sample_validation_images(models, model_dir: Path, cfg, resolution: int) -> list[np.ndarray]:
    """uint8 HWC images. The pipeline works on inference copies of the trained modules (the
    trained ones, which a CUDA graph may replay, keep their storage), without gradients."""
    rows = [{"prompt": cfg.validation_prompt, "seed": image_seed(cfg.seed, cfg.validation_prompt, index)}
            for index in range(cfg.num_validation_images)]
    device = models.device
    batch_size = cfg.sample_batch_size or default_batch_size(device.type == "cuda")
    settings = pipeline_settings(cfg.validation_inference_steps, cfg.guidance_scale, resolution)
    with torch.no_grad(), decoder_on_device(models):
        pipeline = pipeline_from_models(models, model_dir, cfg.sampler)
        images = [image for start in range(0, len(rows), batch_size)
                  for image in render(pipeline, rows[start:start + batch_size], device.type, settings)]
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images


def grid(images: list[np.ndarray]) -> np.ndarray:
    """Images of one size in a near-square grid, row by row; empty cells black."""
    rows, columns = grid_shape(len(images))
    height, width, channels = images[0].shape
    canvas = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return canvas


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the grid of `count` images."""
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns
