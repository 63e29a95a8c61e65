"""The training images as Ray Data datasets for Ray Train's worker processes: all instance
images for every worker, and each worker's own class images, read in a handful of tasks."""

from __future__ import annotations

from pathlib import Path

from raybooth.driver.cluster import cluster_resource
from raybooth.files.images import DEFAULT_INTERPOLATION, load_images


def image_dataset(paths: list[Path], resolution: int, parallelism: int, interpolation: str = DEFAULT_INTERPOLATION):
    """Rows {path, image} for `paths`, read by up to `parallelism` tasks, resized with the filter
    `interpolation` names (--image_interpolation_mode)."""
    import ray.data

    items = [{"path": str(path)} for path in paths]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), parallelism))).map_batches(
        load_images, batch_size=None, fn_kwargs={"resolution": resolution, "interpolation": interpolation})


def datasets(instance_paths: list[Path], shares: list[list[dict]], resolution: int,
             interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    """Ray Data reads the images: all instance images for every worker, and each worker's own
    class images as a dataset of its own ("class_RANK"), so none is read twice or dropped."""
    parallelism = max(1, int(cluster_resource("CPU")) - len(shares))
    out = {"instance": image_dataset(instance_paths, resolution, parallelism, interpolation)}
    for rank, share in enumerate(shares):
        paths = [Path(entry["path"]) for entry in share if "path" in entry]
        if paths:
            out[f"class_{rank}"] = image_dataset(paths, resolution, max(1, parallelism // len(shares)), interpolation)
    return out
