"""Batch image generation on Ray Data: a pool of actors, each holding one pipeline (one per GPU,
or on CPU where there is none), turns rows of (prompt, index, seed) into PNGs that the driver
writes. Where one actor would do it on a Ray this command would start, the command's own process
renders instead, without Ray (local_generation.py). Each image's file name and
seed follow from its prompt and index alone, so a re-run finds what is already there and makes
only what is missing, with the same result."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from raybooth.cluster import check_fits, cluster_resource, connect, cpus_per_worker, decide_use_gpu
from raybooth.config import GenerateConfig
from raybooth.config.fields import inference_steps
from raybooth.errors import RayboothError
from raybooth.log import log, quiet_model_libraries
from raybooth.lora import check_lora_dir, load_adapters
from raybooth.models import resolve_model_dir, resolve_resolution
from raybooth.prompts import check_prompt_lengths
from raybooth.watch.progress import ImageProgress, terminal_shows_bars
from raybooth.watch.raylog import send_ray_output

GENERATE_RAY_LOG = ".raybooth-ray.log"  # in the output folder, hidden among the images


_GENERATED_NAME = re.compile(r"-([0-9a-f]{8})-\d{4,}\.png$")


def prompt_digest(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:8]


def image_name(prompt: str, index: int) -> str:
    """`a-photo-of-a-toy-car-1b2c3d4e-0007.png`: readable, and unique per prompt and index."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    return f"{slug}-{prompt_digest(prompt)}-{index:04d}.png"


def generated_for(name: str) -> str | None:
    """The prompt digest in the name of an image we generated; None for anyone else's image."""
    match = _GENERATED_NAME.search(name)
    return match.group(1) if match else None


def image_seed(base_seed: int, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are signed 64-bit


def missing_images(prompts: list[str], num_samples_per_prompt: int, output_dir: Path,
                   base_seed: int) -> list[dict]:
    return [{"prompt": prompt, "index": index, "seed": image_seed(base_seed, prompt, index),
             "file": image_name(prompt, index)}
            for prompt in prompts for index in range(num_samples_per_prompt)
            if not (output_dir / image_name(prompt, index)).exists()]


def inference_dtype(name: str, device: str):
    import torch

    from raybooth.models import half_precision_dtype

    if name == "auto":
        return half_precision_dtype() if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def render(pipeline, rows: list[dict], device: str, settings: dict) -> list[np.ndarray]:
    """uint8 HWC images for `rows` (prompt, seed), as the pipeline makes them. One generator per
    image: its noise depends on its own seed, not on the batch it lands in."""
    import torch

    generators = [torch.Generator(device).manual_seed(int(row["seed"])) for row in rows]
    images = pipeline([row["prompt"] for row in rows], generator=generators, output_type="np", **settings).images
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
    from diffusers import StableDiffusionPipeline

    from raybooth.models import use_flash_attention

    without_checker = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)
    # Built in host memory, then moved: reading each weight straight onto the GPU (device_map)
    # loaded no faster (bench/RESULTS.md, runs AH and BD).
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, **without_checker).to(
        device, inference_dtype(dtype, device))
    if lora_weights:
        load_adapters(pipeline, Path(lora_weights), lora_scale)
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, sampler)
    use_flash_attention(device)
    return pipeline


class ImageGenerator:
    """A Ray Data actor: loads the pipeline once, then renders batches of rows."""

    def __init__(self, model_dir: str, use_gpu: bool, dtype: str, sampler: str, num_inference_steps: int,
                 guidance_scale: float, resolution: int, safety_checker: bool = True, lora_weights: str | None = None,
                 lora_scale: float = 1.0):
        # By the request, not by what is visible: a CPU actor on a GPU node still sees the GPUs.
        self.device = "cuda" if use_gpu else "cpu"
        self.pipeline = load_pipeline(model_dir, self.device, dtype, sampler, safety_checker, lora_weights, lora_scale)
        self.settings = pipeline_settings(num_inference_steps, guidance_scale, resolution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [{"prompt": prompt, "seed": seed} for prompt, seed in zip(batch["prompt"], batch["seed"])]
        return {"file": list(batch["file"]), "image": render(self.pipeline, rows, self.device, self.settings)}


def encode_pngs(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """PNG encoding, in CPU tasks beside the GPU actors rather than on their critical path."""
    return {"file": list(batch["file"]), "png": [png_bytes(Image.fromarray(image)) for image in batch["image"]]}


def png_bytes(image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **({"format": "PNG"} | options))
    return buffer.getvalue()


def default_batch_size(use_gpu: bool) -> int:
    # Measured on an H100 at 512 px: 1.5 images/s at batch 4, 3.0 at 16, 3.1 at 32 (bench/RESULTS.md).
    return 16 if use_gpu else 4


def write_atomically(path: Path, data: bytes) -> None:
    """A file appears whole or not at all, so an interrupted run never leaves a broken image
    that a re-run would count as done."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def actor_count(cfg: GenerateConfig, use_gpu: bool, gpus: int, images: int, batch_size: int) -> int:
    """Generation actors: --num_workers, else one per GPU (or one on CPU), no more than there are batches."""
    return max(1, min(cfg.num_workers or (gpus if use_gpu else 1), math.ceil(images / batch_size)))


def generate(cfg: GenerateConfig) -> list[Path]:
    """Make the images of `cfg` that `cfg.output_dir` lacks; returns every image's path."""
    from raybooth.local_generation import generate_here, local_device

    cfg.validate()
    model_dir = resolve_model_dir(cfg.model_dir)
    resolution = resolve_resolution(model_dir, cfg.resolution)
    lora_weights = cfg.lora_weights_dir and str(check_lora_dir(cfg.lora_weights_dir, model_dir))
    check_prompt_lengths(model_dir, {f"--prompts {i}": p for i, p in enumerate(cfg.prompts, 1)}, {})
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RayboothError(f"output {output_dir} is a file, not a folder")
    wanted = [output_dir / image_name(p, i) for p in cfg.prompts for i in range(cfg.num_samples_per_prompt)]
    todo = missing_images(cfg.prompts, cfg.num_samples_per_prompt, output_dir, cfg.seed)
    log(f"{len(wanted) - len(todo)} of {len(wanted)} images already in {output_dir}; generating {len(todo)}")
    if not todo:
        return wanted
    output_dir.mkdir(parents=True, exist_ok=True)
    device = local_device(cfg, len(todo))
    if device is not None:  # local mode: no Ray
        batch_size = cfg.batch_size or default_batch_size(device == "cuda")
        log(f"rendering on {'GPU' if device == 'cuda' else 'CPU'} in this process (local mode), "
            f"in batches of {batch_size}")
        with image_progress(len(todo), output_dir) as progress:
            generate_here(cfg, model_dir, lora_weights, device, resolution, todo, batch_size, progress)
        return wanted
    send_ray_output(output_dir / GENERATE_RAY_LOG, cfg.verbose)
    connect(cfg.address, cfg.verbose)
    use_gpu = decide_use_gpu(cfg.use_gpu)
    batch_size = cfg.batch_size or default_batch_size(use_gpu)
    actors = actor_count(cfg, use_gpu, int(cluster_resource("GPU")), len(todo), batch_size)
    if use_gpu:
        check_fits(f"generation with {actors} actors", actors, "GPU")
    log(f"rendering on {'GPU' if use_gpu else 'CPU'} with {actors} Ray Data actor(s), in batches of {batch_size}")
    with image_progress(len(todo), output_dir) as progress:
        generate_on_ray_data(cfg, model_dir, lora_weights, use_gpu, resolution, todo, actors, batch_size, progress)
    return wanted


@contextmanager
def image_progress(images: int, output_dir: Path) -> Iterator[ImageProgress]:
    progress = ImageProgress(images, "images", log, terminal_shows_bars(), every=math.ceil(images / 10),
                             where=f"in {output_dir}")
    yield progress
    progress.close()


def generate_on_ray_data(cfg: GenerateConfig, model_dir: Path, lora_weights: str | None, use_gpu: bool,
                         resolution: int, todo: list[dict], actors: int, batch_size: int,
                         progress: ImageProgress) -> None:
    """`todo`'s images from a pool of Ray Data actors, one pipeline each; PNGs encoded in CPU tasks,
    written here."""
    import ray.data

    images = ray.data.from_items(todo).map_batches(
        ImageGenerator, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_worker(actors, use_gpu),
        fn_constructor_kwargs=dict(model_dir=str(model_dir), use_gpu=use_gpu, dtype=cfg.dtype, resolution=resolution,
                                   sampler=cfg.sampler,
                                   num_inference_steps=inference_steps(cfg.sampler, cfg.num_inference_steps),
                                   guidance_scale=cfg.guidance_scale, safety_checker=cfg.safety_checker,
                                   lora_weights=lora_weights, lora_scale=cfg.lora_scale)
    ).map_batches(encode_pngs, batch_size=None)
    for row in images.iter_rows():
        write_atomically(Path(cfg.output_dir) / row["file"], row["png"])
        progress.update(1)
