"""Local mode's head start: where the one worker will run in this process, its models start
loading and its images reading on threads of their own before Ray starts. `ray.init` mostly waits
for Ray's processes; beside the loading thread it takes about 3 s longer, but the models are then
mostly loaded when the loop starts (bench/RESULTS.md). The worker takes them (train/preload.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raybooth.config import TrainConfig
from raybooth.driver.cluster import ray_started_here
from raybooth.driver.plan import uses_local_mode
from raybooth.train.preload import Preloaded, Preloading, local_devices


def preload(cfg: TrainConfig, model_dir: Path, instance_paths: list[Path], class_paths: list[str],
            resolution: int) -> Preloaded | None:
    """Where the run will be in local mode (on a Ray this command starts), the models start
    loading and the images reading now, before Ray starts. The devices are guessed from torch
    (Ray has not counted the GPUs yet): the worker loads anew if they are other than the plan's."""
    if not uses_local_mode(cfg, ray_started_here(cfg.address)):  # as the trainer decides it once Ray is up
        return None

    def read() -> tuple[dict, dict]:
        from raybooth.files.images import read_images

        threads, interpolation = min(8, os.cpu_count() or 1), cfg.image_interpolation_mode
        return (read_images([str(path) for path in instance_paths], resolution, threads, interpolation),
                read_images(list(class_paths), resolution, threads, interpolation))

    def load() -> tuple[list[str], Any]:
        import torch

        from raybooth.models.loading import load_for_training
        from raybooth.terminal.log import quiet_model_libraries
        from raybooth.train.precision import Precision

        quiet_model_libraries()
        use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
        names = local_devices(use_gpu, cfg.gpus_per_worker)
        devices = [torch.device(name) for name in names]
        frozen_dtype = Precision(cfg.mixed_precision, devices[0]).frozen_dtype
        return names, load_for_training(model_dir, devices[0], devices[-1], frozen_dtype, cfg.trains_text_encoder,
                                        cfg.use_lora, cfg.pretrained_vae_model_name_or_path)

    return Preloaded(models=Preloading(load), images=Preloading(read))
