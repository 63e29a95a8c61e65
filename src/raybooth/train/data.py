"""A training worker's images: from its Ray Data shards (all instance images, its own class
images), or in local mode from the command's own read (driver/preload.py)."""

from __future__ import annotations

from typing import Callable

import numpy as np


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
