"""The training data on Ray Data: instance and class images, read and resized once, paired
row by row, then randomly cropped and normalized afresh every epoch.

Each row of the training dataset holds one instance example and one class example, each
with its own prompt ids, so a batch of B rows is B instance + B class images whose prompts
can never be shuffled apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raybooth.images import exif_orientation


def tokenize(tokenizer, prompt: str) -> np.ndarray:
    """Prompt ids padded to the text encoder's full context, as SD was trained."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids[0].astype(np.int64)


# What turns a photo stored with EXIF orientation N upright (as PIL's ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    if orientation not in _UPRIGHT:
        return image
    return np.asarray(Image.fromarray(image).transpose(_UPRIGHT[orientation]))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Scale so the shorter side is `size`, keeping the aspect ratio (photos come at 600-4000 px)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BICUBIC))


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    top = rng.integers(0, height - size + 1)
    left = rng.integers(0, width - size + 1)
    return image[top:top + size, left:left + size]


def to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 HWC in [0, 255] to float32 CHW in [-1, 1], the VAE's input range."""
    return image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


def read_resized(paths: list[Path], resolution: int):
    """Images as rows {image, name}, turned upright and resized to `resolution` on the shorter side."""
    import ray.data

    orientations = {path.name: exif_orientation(path) for path in paths}

    def resize(row: dict) -> dict:
        name = Path(row["path"]).name
        return {"image": resize_shorter_side(upright(row["image"], orientations[name]), resolution), "name": name}

    return ray.data.read_images([str(p) for p in paths], mode="RGB", include_paths=True,
                                file_extensions=None).map(resize)


def partners(instance_paths: list[Path], class_paths: list[Path]) -> dict[str, list[int]]:
    """Which instance images each class image is paired with, by class file name: pair k joins
    class image k % C with instance image k % I, for k below max(I, C). Five subject photos
    against 200 class images: each photo 40 times, each class image once."""
    pairs: dict[str, list[int]] = {path.name: [] for path in class_paths}
    for k in range(max(len(instance_paths), len(class_paths))):
        pairs[class_paths[k % len(class_paths)].name].append(k % len(instance_paths))
    return pairs


def pair_images(instance_paths: list[Path], class_paths: list[Path], resolution: int):
    """Rows {instance_image, class_image}: every class image with its partner instance images,
    decoded and resized once and kept in the object store (a 2048 px JPEG is slow to decode
    every epoch). The few instance images travel with the task; the class images stream."""
    by_name = {row["name"]: row["image"] for row in read_resized(instance_paths, resolution).take_all()}
    instance_images = [by_name[path.name] for path in instance_paths]
    pairing = partners(instance_paths, class_paths)

    def attach_instances(row: dict) -> list[dict]:
        return [{"instance_image": instance_images[i], "class_image": row["image"]} for i in pairing[row["name"]]]

    return read_resized(class_paths, resolution).flat_map(attach_instances).materialize()


def crop_and_tokenize(batch: dict[str, np.ndarray], resolution: int, instance_prompt_ids: np.ndarray,
                      class_prompt_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of pairs made model-ready: a fresh random crop of each image, normalized, and
    each example's prompt ids. Ray Data reruns this every epoch, so the crops differ each time."""
    rng = np.random.default_rng()
    out = {}
    for role, ids in (("instance", instance_prompt_ids), ("class", class_prompt_ids)):
        images = batch[f"{role}_image"]
        out[f"{role}_pixels"] = np.stack([to_pixels(random_crop(image, resolution, rng)) for image in images])
        out[f"{role}_prompt_ids"] = np.tile(ids, (len(images), 1))
    return out


def build_train_dataset(instance_paths: list[Path], class_paths: list[Path], instance_prompt_ids: np.ndarray,
                        class_prompt_ids: np.ndarray, resolution: int):
    pairs = pair_images(instance_paths, class_paths, resolution)
    return pairs.map_batches(crop_and_tokenize, batch_size=16, fn_kwargs=dict(
        resolution=resolution, instance_prompt_ids=instance_prompt_ids, class_prompt_ids=class_prompt_ids))


def join_instance_and_class(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One model batch from a batch of pairs: all instance images, then all class images, and
    the prompt ids in the same order, row for row (the loss splits the halves apart again)."""
    pixels = torch.cat([batch["instance_pixels"], batch["class_pixels"]])
    prompt_ids = torch.cat([batch["instance_prompt_ids"], batch["class_prompt_ids"]])
    return pixels, prompt_ids
