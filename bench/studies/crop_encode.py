"""Issue 5, target 3: the 1+1 step as raybooth's batches feed it from photos that are not square
(four 683x512 photos: 688 crops, so nearly every step of a short run draws a crop never encoded),
one row per way of encoding the new crops, in one process on one GPU, as `raybooth train` runs by
default there (UNet channels-last, fp32 weights under bf16 autocast, CUDA graph, flash attention):

- "in the step's stream": each new crop encoded just before its step, after the step before;
- "beside the step": on a stream of its own while the step before runs (CropLatents.stream, which
  the worker sets since run BB showed it faster);
- "all before the first step": every crop encoded first, 16 at a time (the default where a run
  draws each crop twice); its steps show the step with no crop to encode.

Also one crop's encoding alone, and sixteen's. Prints one JSON line per row.

    python bench/studies/crop_encode.py MODEL_DIR [STEPS]     # STEPS timed per row (100 by default)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: its shared helpers

import json  # noqa: E402
import time

import numpy as np
import torch
from mfu import timed

from raybooth.models.loading import load_for_training, use_flash_attention
from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.crop_latents import encode
from raybooth.train.graphs import GraphedStep
from raybooth.train.optim import make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

DEVICE = torch.device("cuda")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main(model_dir: str, steps: int = 100) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the worker sets them
    use_flash_attention(DEVICE)
    precision = Precision("bf16", DEVICE)
    models = load_for_training(model_dir, DEVICE, DEVICE, precision.frozen_dtype, True)
    models.unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (512, 683, 3), dtype=np.uint8) for _ in range(4)]
    classes = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]
    emit(gpu=torch.cuda.get_device_name(), torch=torch.__version__)

    def training_set() -> TrainingSet:
        images = TrainingSet(photos, classes, 512, pairing(4, 8, 200, 0, 1), 1, np.arange(77), np.arange(77) + 1,
                             DEVICE, seed=0)
        images.cache_class_latents(models.vae)
        images.remember_crop_latents(models.vae)
        return images

    crops = training_set()
    for count in (1, 16):
        ms = timed(lambda: encode(models.vae, crops.crop_images(crops.all_crops()[:count])), repeats=10)
        emit(what=f"encode {count} crop(s)", ms=round(ms, 1), ms_per_crop=round(ms / count, 2))

    def eager(batch):
        return train_step(models, optimizer, precision, batch, 1.0, 1.0)

    for variant in ("in the step's stream", "beside the step", "all before the first step"):
        images = training_set()
        if variant == "beside the step":
            images.crop_latents.stream = torch.cuda.Stream(DEVICE)
        if variant == "all before the first step":
            images.crop_latents.encode_new(images.all_crops())
        step = GraphedStep(eager, lambda: optimizer.zero_grad(set_to_none=True), 3, torch.cuda.Stream(DEVICE))
        batches = images.batches(1000, steps + 5)
        for _ in range(5):  # warm-up eager steps, the capture, and a replay
            loss = step(next(batches)[2])
        loss.total.item()
        kept_before = len(images.crop_latents.kept)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _, _, batch in batches:
            loss = step(batch)
        loss.total.item()
        emit(what="1+1 step", variant=variant, step_ms=round((time.perf_counter() - started) / steps * 1e3, 1),
             new_crops=len(images.crop_latents.kept) - kept_before,
             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        del step, batches  # the graph's memory pool
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
