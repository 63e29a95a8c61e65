"""Reading the training images: each is decoded once, turned upright and resized on its shorter
side to the training resolution, and the workers keep the result in memory (batches.py) and crop
from there: a few hundred images need no per-epoch pipeline. For Ray Train's worker processes Ray
Data reads them in a handful of tasks. The one worker of local mode, the command's own process,
reads them itself with a few threads, beside the model's load and before Ray is up: Ray Data's
tasks and the object store's round trip took 5.4-5.9 s on an H100 machine (bench/RESULTS.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from raybooth.images import open_image, to_rgb


def tokenize(tokenizer, prompt: str, max_length: int | None = None) -> np.ndarray:
    """Prompt ids padded to the text encoder's full context, as SD was trained (or to `max_length`:
    diffusers' --tokenizer_max_length)."""
    return tokenizer(prompt, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="np").input_ids[0].astype(np.int64)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (photos come at 600-4000 px)."""
    scale = size / min(image.size)
    new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """One image as uint8 RGB (HWC), upright by its EXIF orientation, shorter side `resolution`."""
    with open_image(path) as image:
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale for a fraction of the time, never below the size we need.
        scale = resolution / min(image.size)
        image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        image = ImageOps.exif_transpose(image)
        return np.asarray(resize_shorter_side(to_rgb(image), resolution))


def load_images(batch: dict[str, np.ndarray], resolution: int) -> dict[str, list]:
    return {"path": list(batch["path"]), "image": [load_image(path, resolution) for path in batch["path"]]}


def image_dataset(paths: list[Path], resolution: int, parallelism: int):
    """Rows {path, image} for `paths`, read by up to `parallelism` tasks."""
    import ray.data

    items = [{"path": str(path)} for path in paths]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), parallelism))).map_batches(
        load_images, batch_size=None, fn_kwargs={"resolution": resolution})


def read_images(paths: list[str], resolution: int, threads: int = 8) -> dict[str, np.ndarray]:
    """{path: image} for `paths`, as Ray Data's tasks make them, read by a few threads of this
    process (Pillow decodes and resizes without holding Python's lock)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(zip(paths, pool.map(lambda path: load_image(path, resolution), paths)))


def read_all(shard) -> dict[str, np.ndarray]:
    """A worker's dataset shard, whole: {path: image}."""
    return {row["path"]: row["image"] for row in shard.iter_rows()}


def read_worker_images(rank: int, class_paths: list[str], say,
                       read_already: Callable[[], tuple[dict, dict]] | None = None
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """In a Ray Train worker: all instance images, and this worker's class images, in the plan's
    order (said when read: this runs beside the model's load). From its dataset shards, or, in
    local mode, from `read_already` (the command's own read: {path: image} of each)."""
    import ray.train

    if read_already is not None:
        instance, by_path = read_already()
    else:
        instance = read_all(ray.train.get_dataset_shard("instance"))
        by_path = read_all(ray.train.get_dataset_shard(f"class_{rank}")) if class_paths else {}
    say(f"read {len(instance)} instance images and this worker's {len(by_path)} class images")
    return [instance[path] for path in sorted(instance)], [by_path[path] for path in class_paths]
