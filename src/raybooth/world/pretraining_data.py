"""The pretraining set: world scenes rendered once (in a process pool: rendering is numpy and
PIL work that one core does at a few hundred images a second), and their captions as token ids,
with the variants that teach short prompts and classifier-free guidance."""

from __future__ import annotations

import dataclasses
import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch

from raybooth.world.scenes import CHECKERBOARD, COLORS, SUBJECT_COLORS, Scene, caption, random_scene, render

# Which caption a training row gets. Short variants make "a photo of a toy car" mean any colour
# anywhere; the empty caption (10%, as in SD) is the unconditional branch of guidance.
CAPTION_VARIANTS = ("full", "no colour", "no background", "class only", "empty")
VARIANT_WEIGHTS = (0.5, 0.15, 0.15, 0.1, 0.1)


def autoencoder_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    """A broader distribution for the VAE alone, as SD's VAE saw far more than SD's captions name:
    objects in any colour, half of them chequered in two colours at 2 to 6 squares across.
    Never captioned, and never the subject's own pair of colours; without these an autoencoder
    of the eight-colour world snaps every other colour to the nearest of the eight and paints a
    chequered object in one colour, and no fine-tuning of the UNet could show the subject."""
    def any_color() -> str:
        return COLORS[rng.integers(len(COLORS))] if rng.random() < 0.5 else "#%02x%02x%02x" % tuple(
            rng.integers(0, 256, 3))

    scenes = []
    while len(scenes) < count:
        scene = dataclasses.replace(random_scene(rng), color=any_color())
        if rng.random() < 0.5:
            scene = dataclasses.replace(scene, pattern=CHECKERBOARD, second_color=any_color(),
                                        cells=round(float(rng.uniform(2, 6)), 2))
            if {scene.color, scene.second_color} == set(SUBJECT_COLORS):
                continue
        scenes.append(scene)
    return scenes


def _render_chunk(args: tuple[list[Scene], int]) -> np.ndarray:
    scenes, size = args
    return np.stack([render(scene, size) for scene in scenes])


def render_dataset(scenes: list[Scene], size: int = 64, workers: int = 1) -> np.ndarray:
    """(N, size, size, 3) uint8 images of `scenes`, in order. Workers are spawned, not forked,
    so a process that already holds CUDA state can call this safely."""
    if workers <= 1 or len(scenes) < 256:
        return _render_chunk((scenes, size))
    chunk = max(64, len(scenes) // (workers * 8))
    pieces = [(scenes[start:start + chunk], size) for start in range(0, len(scenes), chunk)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.concatenate(pool.map(_render_chunk, pieces))


@dataclass
class CaptionTable:
    """Every distinct caption once, as token ids, and for each scene the row of each variant.
    The world has only a few hundred distinct captions, so tokenizing is instant and the
    training loop picks captions by indexing, on the device."""

    token_ids: torch.Tensor  # (distinct captions, context) int64; row 0 is the empty caption
    rows: torch.Tensor  # (scenes, len(CAPTION_VARIANTS)) int64 into token_ids

    def to(self, device: torch.device) -> "CaptionTable":
        return CaptionTable(self.token_ids.to(device), self.rows.to(device))

    def sample(self, scene_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids for the given scenes, each with a variant drawn by VARIANT_WEIGHTS."""
        weights = torch.tensor(VARIANT_WEIGHTS, device=scene_index.device)
        variant = torch.multinomial(weights, len(scene_index), replacement=True, generator=generator)
        return self.token_ids[self.rows[scene_index, variant]]


def variant_text(scene: Scene, variant: str) -> str:
    if variant == "empty":
        return ""
    return caption(scene, with_color=variant in ("full", "no background"),
                   with_background=variant in ("full", "no colour"))


def caption_table(scenes: list[Scene], tokenizer) -> CaptionTable:
    from raybooth.world.pipeline import tokenize

    distinct: dict[str, int] = {"": 0}
    rows = np.zeros((len(scenes), len(CAPTION_VARIANTS)), dtype=np.int64)
    for index, scene in enumerate(scenes):
        for column, variant in enumerate(CAPTION_VARIANTS):
            rows[index, column] = distinct.setdefault(variant_text(scene, variant), len(distinct))
    return CaptionTable(tokenize(tokenizer, list(distinct)), torch.from_numpy(rows))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range SD's VAE works in."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)
