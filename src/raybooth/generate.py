"""Batch image generation on Ray Data: a pool of actors, each holding one pipeline (one per GPU,
or on CPU where there is none), turns rows of (prompt, index, seed) into PNGs that the driver
writes. Each image's file name and seed follow from its prompt and index alone, so a re-run
finds what is already there and makes only what is missing, with the same result."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from raybooth.cluster import check_fits, cluster_resource, connect, cpus_per_worker, decide_use_gpu
from raybooth.config import GenerateConfig
from raybooth.errors import RayboothError
from raybooth.log import log, quiet_model_libraries
from raybooth.lora import check_lora_dir, fuse_adapters, load_adapters
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


class ImageGenerator:
    """A Ray Data actor: loads the pipeline once, then renders batches of rows."""

    def __init__(self, model_dir: str, use_gpu: bool, dtype: str, num_inference_steps: int, guidance_scale: float,
                 resolution: int, safety_checker: bool = True, lora_weights: str | None = None,
                 lora_scale: float = 1.0):
        quiet_model_libraries()
        from diffusers import StableDiffusionPipeline

        # By the request, not by what is visible: a CPU actor on a GPU node still sees the GPUs.
        self.device = "cuda" if use_gpu else "cpu"
        without_checker = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)
        self.pipeline = StableDiffusionPipeline.from_pretrained(model_dir, **without_checker).to(
            self.device, inference_dtype(dtype, self.device))
        if lora_weights:
            load_adapters(self.pipeline, Path(lora_weights), lora_scale)
        self.pipeline.set_progress_bar_config(disable=True)
        self.settings = pipeline_settings(num_inference_steps, guidance_scale, resolution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [{"prompt": prompt, "seed": seed} for prompt, seed in zip(batch["prompt"], batch["seed"])]
        return {"file": list(batch["file"]), "image": render(self.pipeline, rows, self.device, self.settings)}


def encode_pngs(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """PNG encoding, in CPU tasks beside the GPU actors rather than on their critical path."""
    return {"file": list(batch["file"]), "png": [png_bytes(Image.fromarray(image)) for image in batch["image"]]}


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
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


def generate(cfg: GenerateConfig) -> list[Path]:
    """Make the images of `cfg` that `cfg.output_dir` lacks; returns every image's path."""
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
    send_ray_output(output_dir / GENERATE_RAY_LOG, cfg.verbose)
    connect(cfg.address, cfg.verbose)
    use_gpu = decide_use_gpu(cfg.use_gpu)
    actors = cfg.num_workers or (int(cluster_resource("GPU")) if use_gpu else 1)
    batch_size = cfg.batch_size or default_batch_size(use_gpu)
    actors = max(1, min(actors, math.ceil(len(todo) / batch_size)))
    if use_gpu:
        check_fits(f"generation with {actors} actors", actors, "GPU")

    import ray.data

    images = ray.data.from_items(todo).map_batches(
        ImageGenerator, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_worker(actors, use_gpu),
        fn_constructor_kwargs=dict(model_dir=str(model_dir), use_gpu=use_gpu, dtype=cfg.dtype, resolution=resolution,
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   safety_checker=cfg.safety_checker,
                                   lora_weights=lora_weights, lora_scale=cfg.lora_scale)
    ).map_batches(encode_pngs, batch_size=None)
    progress = ImageProgress(len(todo), "images", log, terminal_shows_bars(), every=math.ceil(len(todo) / 10),
                             where=f"in {output_dir}")
    for row in images.iter_rows():
        write_atomically(output_dir / row["file"], row["png"])
        progress.update(1)
    progress.close()
    return wanted


def pipeline_from_models(models, model_dir: Path, safety_checker: bool = False):
    """A generation pipeline over a training worker's modules, in the dtype and on the device that
    `raybooth generate` would load them with, so a seed gives the same image either way. The
    trained modules are copied (they stay fp32 for training), LoRA adapters fused into the copy
    as `raybooth generate --lora_weights_dir` fuses them; frozen modules are shared."""
    import copy

    from diffusers import StableDiffusionPipeline

    from raybooth.parallel import unwrap

    device = models.device
    dtype = inference_dtype("auto", device.type)

    def for_inference(module):
        module = unwrap(module)
        if module.dtype == dtype and module.device == device and not any(p.requires_grad for p in module.parameters()):
            return module
        return fuse_adapters(copy.deepcopy(module)).to(device, dtype).eval().requires_grad_(False)

    without_checker = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)
    # A text encoder freed by --pre_compute_text_embeddings is loaded again from model_dir.
    text_encoder = {} if models.text_encoder is None else {"text_encoder": for_inference(models.text_encoder)}
    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, unet=for_inference(models.unet), vae=for_inference(models.vae), **text_encoder,
        **without_checker).to(device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_pngs(folder: str, files: list[str], images: list[np.ndarray]) -> None:
    for file, image in zip(files, images):
        write_atomically(Path(folder) / file, png_bytes(Image.fromarray(image)))


def render_on_worker(pipeline, rows: list[dict], folder: Path, batch_size: int, settings: dict, what: str,
                     say: Callable[[str], None], bar: bool = False) -> list[np.ndarray]:
    """Images for `rows` (prompt, seed, file) from a worker's pipeline, written to `folder` whole
    or not at all. PNG encoding runs in Ray tasks: in threads here it held up the GPU's work."""
    import ray

    writer = ray.remote(write_pngs)
    device = pipeline.device.type
    images: list[np.ndarray] = []
    written = []
    progress = ImageProgress(len(rows), what, say, bar)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        made = render(pipeline, chunk, device, settings)
        written.append(writer.remote(str(folder), [row["file"] for row in chunk], made))
        images += made
        progress.update(len(made))
    ray.get(written)
    progress.close()
    return images


def make_images_on_worker(models, model_dir: Path, rows: list[dict], folder: Path, cfg, resolution: int, what: str,
                          say: Callable[[str], None], safety_checker: bool = False,
                          bar: bool = False) -> list[np.ndarray]:
    """A training worker's share of images (class images before training, samples after), made
    with the modules it holds rather than a second copy of the model in another process; with
    `bar`, a progress bar in the driver's terminal."""
    if not rows:
        return []
    import torch

    pipeline = pipeline_from_models(models, model_dir, safety_checker)
    batch_size = cfg.sample_batch_size or default_batch_size(models.device.type == "cuda")
    settings = pipeline_settings(cfg.num_inference_steps, cfg.guidance_scale, resolution)
    images = render_on_worker(pipeline, rows, folder, batch_size, settings, what, say, bar)
    del pipeline
    if models.device.type == "cuda":
        torch.cuda.empty_cache()
    return images
