"""`raybooth generate` on Ray Data: a pool of actors, each holding one pipeline (one per GPU, or
on CPU where there is none), turns rows of (prompt, index, seed) into PNGs that the driver
writes. Where one actor would do it on a Ray this command would start, the command's own process
renders instead, without Ray (local_generation.py). Names and seeds follow from prompt and index
alone (files/names.py), so a re-run makes only what is missing, with the same result."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from raybooth.config import GenerateConfig
from raybooth.config.fields import inference_steps
from raybooth.driver.cluster import check_fits, cluster_resource, connect, cpus_per_worker, decide_use_gpu
from raybooth.errors import RayboothError
from raybooth.files.names import image_name, missing_images
from raybooth.files.writes import png_bytes, write_atomically
from raybooth.generate.pipelines import actor_count, default_batch_size, load_pipeline, pipeline_settings, render
from raybooth.models.folders import resolve_model_dir, resolve_resolution
from raybooth.models.lora import check_lora_dir
from raybooth.models.prompts import check_prompt_lengths
from raybooth.terminal.log import log
from raybooth.terminal.progress import ImageProgress, terminal_shows_bars
from raybooth.terminal.raylog import send_ray_output

GENERATE_RAY_LOG = ".raybooth-ray.log"  # in the output folder, hidden among the images


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


def generate(cfg: GenerateConfig) -> list[Path]:
    """Make the images of `cfg` that `cfg.output_dir` lacks; returns every image's path."""
    from raybooth.driver.local_generation import generate_here, local_device

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
