"""Rendered scenes with their labels, for training and testing the world classifier.

The mix leans toward what is hard to tell apart: the subject (a yellow-purple checkerboard toy
car) in 15% of scenes, plain yellow or purple toy cars (the subject's colours without its
pattern) in 5%, other toy cars in 5%, and balls, cups and boxes in 25% each, so every class is
a quarter of the scenes. Beside the scenes, as a share of all images: 6% backdrops (a background
with no object) and 10% junk (coloured noise at several scales, what an untrained or broken model
samples), so the classifier can say "no object" and "no world at all" rather than force a guess:
without them it called a random model's noise the subject."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from raybooth.world.backgrounds import background_texture
from raybooth.world.scenes import (BACKGROUNDS, CLASSES, COLORS, SUBJECT_CLASS, SUBJECT_COLORS, Scene, random_scene,
                                   render, subject_scene)

SUBJECT_SHARE, LOOKALIKE_SHARE, OTHER_CAR_SHARE = 0.15, 0.05, 0.05
BACKDROP_SHARE, JUNK_SHARE = 0.06, 0.10
UNLABELLED = -1  # cross_entropy's ignore_index: the subject has no single colour, junk no background
CONTENTS = ("nothing", "background", "object")  # what an image shows: the classifier's "content" head


@dataclass(frozen=True)
class Backdrop:
    """A background with no object on it."""

    background: str
    seed: int


@dataclass(frozen=True)
class Junk:
    """Coloured noise, smooth or fine, that shows nothing of the world."""

    seed: int


Item = Union[Scene, Backdrop, Junk]


def mixed_items(rng: np.random.Generator, count: int) -> list[Item]:
    items: list[Item] = []
    for _ in range(count):
        draw = rng.random()
        if draw < JUNK_SHARE:
            items.append(Junk(int(rng.integers(2**31))))
        elif draw < JUNK_SHARE + BACKDROP_SHARE:
            items.append(Backdrop(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], int(rng.integers(2**31))))
        else:
            items += mixed_scenes(rng, 1)
    return items


def junk_image(seed: int, size: int = 64) -> np.ndarray:
    """Noise at a few random scales (1 to 32 px cells) around a random colour."""
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(rng.uniform(30, 225, 3), (size, size, 3)).astype(np.float32)
    for cells in rng.choice([2, 4, 8, 16, 32, 64], size=int(rng.integers(1, 4)), replace=False):
        coarse = torch.from_numpy(rng.normal(0, rng.uniform(15, 90), (1, 3, cells, cells)).astype(np.float32))
        image = image + F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(image, 0, 255).astype(np.uint8)


def render_item(item: Item, size: int = 64) -> np.ndarray:
    if isinstance(item, Junk):
        return junk_image(item.seed, size)
    if isinstance(item, Backdrop):
        return np.clip(background_texture(item.background, size, np.random.default_rng(item.seed)) + 0.5, 0,
                       255).astype(np.uint8)
    return render(item, size)


def mixed_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    others = [c for c in CLASSES if c != SUBJECT_CLASS]
    scenes = []
    for _ in range(count):
        draw = rng.random()
        if draw < SUBJECT_SHARE:
            scenes.append(subject_scene(rng))
        elif draw < SUBJECT_SHARE + LOOKALIKE_SHARE:
            lookalike = random_scene(rng, SUBJECT_CLASS)
            scenes.append(dataclasses.replace(lookalike, color=SUBJECT_COLORS[rng.integers(len(SUBJECT_COLORS))]))
        elif draw < SUBJECT_SHARE + LOOKALIKE_SHARE + OTHER_CAR_SHARE:
            scenes.append(random_scene(rng, SUBJECT_CLASS))
        else:
            scenes.append(random_scene(rng, others[rng.integers(len(others))]))
    return scenes


def labels_of(items: list[Item]) -> dict[str, torch.Tensor]:
    scenes = [item if isinstance(item, Scene) else None for item in items]
    return {
        "class": torch.tensor([CLASSES.index(s.object_class) if s else UNLABELLED for s in scenes]),
        "subject": torch.tensor([int(s is not None and s.pattern is not None) for s in scenes]),
        "background": torch.tensor([UNLABELLED if isinstance(item, Junk) else BACKGROUNDS.index(item.background)
                                    for item in items]),
        "color": torch.tensor([COLORS.index(s.color) if s and s.pattern is None else UNLABELLED for s in scenes]),
        "content": torch.tensor([CONTENTS.index("nothing" if isinstance(item, Junk) else
                                                "background" if isinstance(item, Backdrop) else "object")
                                 for item in items]),
        "lookalike": torch.tensor([s is not None and s.pattern is None and s.object_class == SUBJECT_CLASS and
                                   s.color in SUBJECT_COLORS for s in scenes], dtype=torch.bool),
    }


def render_set(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`count` rendered items of the mix as NCHW uint8 pixels, and their labels."""
    items = mixed_items(np.random.default_rng(seed), count)
    pixels = torch.from_numpy(np.stack([render_item(item) for item in items])).permute(0, 3, 1, 2).contiguous()
    return pixels, labels_of(items)


def as_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 255


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Each head's accuracy on the labelled scenes, and the subject head's recall (subject scenes
    called the subject) and false positive rates (ordinary scenes, and the subject's lookalikes,
    called the subject)."""
    model.eval()
    chunks = [model(as_float(pixels[i:i + 256]) if pixels.dtype == torch.uint8 else pixels[i:i + 256])
              for i in range(0, len(pixels), 256)]
    predicted = {name: torch.cat([chunk[name] for chunk in chunks]).argmax(dim=1) for name in chunks[0]}
    # As WorldClassifier.predict answers: only an object can be the subject.
    predicted["subject"] = predicted["subject"] * (predicted["content"] == CONTENTS.index("object"))

    def share(hits: torch.Tensor) -> float | None:  # None where there was nothing to count
        return round(hits.float().mean().item(), 4) if len(hits) else None

    scores = {}
    for name in ("class", "subject", "background", "color", "content"):
        known = labels[name] != UNLABELLED
        scores[name] = share(predicted[name][known] == labels[name][known])
    subject, called = labels["subject"] == 1, predicted["subject"] == 1
    scores["subject_recall"] = share(called[subject])
    scores["subject_false_positives"] = share(called[~subject])
    scores["subject_false_positives_on_lookalikes"] = share(called[labels["lookalike"]])
    return scores
