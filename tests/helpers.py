"""Plain helpers that several test modules share (the fixtures are in conftest.py). Test modules
import them with `from helpers import ...`: pytest puts this folder on sys.path (it has no
__init__.py, and conftest.py lives here), under plain `pytest` and `python -m pytest` alike. No
test module imports another test module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from raybooth.commands.cli import build_parser, config_from_args, main
from raybooth.config import TrainConfig
from raybooth.models.folders import model_family
from raybooth.models.loading import load_for_training, load_tokenizers, prompt_ids
from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.loss import Batch

CPU = torch.device("cpu")


# Images on disk.

def write_solid_images(folder: Path, color: tuple[int, int, int], count: int, size=(80, 64)) -> list[Path]:
    """`count` PNGs of one flat color, so a test can tell from pixels which set an image came from."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# Images in memory, and training sets of them.

def solid(value: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def ramps(count: int, width: int) -> list[np.ndarray]:
    """Photos whose every crop differs: a left-to-right ramp, steeper in each photo."""
    return [np.repeat((np.arange(width)[None, :, None] * (k + 1)).astype(np.uint8), 64, axis=0).repeat(3, axis=2)
            for k in range(count)]


def photo_set(pairs: int = 4, random_flip: bool = True) -> TrainingSet:
    """Two ramps 68 wide at 64 px: 5 crops each, 20 with their mirror images."""
    return TrainingSet(ramps(2, 68), [solid(40), solid(200)], 64, pairing(2, 2, pairs, 0, 1), 2,
                       np.array([1]), np.array([2]), CPU, seed=3, random_flip=random_flip)


# Settings.

def config(**overrides) -> TrainConfig:
    """A TrainConfig as `raybooth train` would build it from these settings (paths need not exist)."""
    values = dict(model_dir="m", output_dir="o", instance_images_dir="i", instance_prompt="a photo of sks dog",
                  class_images_dir="c", class_prompt="a photo of a dog")
    return TrainConfig(**values | overrides)


def train_config(*flags: str) -> TrainConfig:
    """The TrainConfig that `raybooth train` parses from these command-line flags."""
    return config_from_args(TrainConfig, build_parser().parse_args([
        "train", "--model_dir", "m", "--output_dir", "o", "--instance_images_dir", "i", "--instance_prompt",
        "a photo of sks dog", "--class_images_dir", "c", "--class_prompt", "a photo of a dog", *flags]))


# `raybooth train` end to end.

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of unqtkn toy car", "a photo of a toy car"


def train_args(model_dir, output_dir, instance_dir, class_dir, *extra) -> list[str]:
    return ["train", "--model_dir", str(model_dir), "--output_dir", str(output_dir),
            "--instance_images_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
            "--class_images_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
            "--num_class_images", "4", "--num_inference_steps", "2", "--report_every_n_steps", "2",
            "--storage_path", str(output_dir.parent / "ray-storage"), *extra]


def train_briefly(model_dir, instance_dir, folder: Path, capsys, *flags) -> tuple[int, str, dict | None]:
    """`raybooth train` for 2 steps on the CPU into `folder`/tuned, with 2 class images of its own
    (none to generate): its exit code, its log, and the training log beside its output (None
    where it wrote none)."""
    class_dir = write_solid_images(folder / "class", (0, 0, 200), 2)[0].parent
    output = folder / "tuned"
    code = main(train_args(model_dir, output, instance_dir, class_dir, "--num_class_images", "2",
                           "--max_train_steps", "2", "--no_use_gpu", *flags))
    record = output / "training_log.json"
    return code, capsys.readouterr().err, json.loads(record.read_text()) if record.is_file() else None


def weights(folder, part):
    name = "model.safetensors" if part.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(folder / part / name)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# The training step on the tiny model.

def fixed_batch(model_dir, size=64) -> Batch:
    """Two instance and two class examples, instance rows first (SDXL's with their time ids)."""
    tokenizers = load_tokenizers(model_dir)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, size, size, generator=generator) * 2 - 1
    ids = [prompt_ids(tokenizers, p) for p in ["a photo of unqtkn toy car"] * 2 + ["a photo of a toy car"] * 2]
    time_ids = (torch.tensor([[size, size, 0, 0, size, size]] * 4, dtype=torch.float32)
                if model_family(model_dir).micro_conditioning else None)
    return Batch(pixels, torch.from_numpy(np.stack(ids)), time_ids=time_ids)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def fp32_models(model_dir, channels_last: bool = False):
    """The tiny model in fp32 on the CPU, text encoder trained; with `channels_last` the UNet in
    the layout --channels_last gives it."""
    models = load_for_training(model_dir, CPU, CPU, torch.float32, True)
    if channels_last:
        models.unet.to(memory_format=torch.channels_last)
    return models


# Hugging Face's cache.

HASH = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(model_dir, cache_dir, name="raybooth/tiny-sd"):
    """Lay a pipeline out as huggingface_hub's cache does: blobs, and snapshots of symlinks."""
    repo = cache_dir / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / HASH
    for file in model_dir.rglob("*"):
        if file.is_file():
            blob = repo / "blobs" / f"{abs(hash(str(file))):x}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, blob)
            link = snapshot / file.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH)
    return snapshot
