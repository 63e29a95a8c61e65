"""The world's backgrounds: textured colour fields (grain, ripples, blades, bricks, clouds),
so a context is told apart by texture as well as by its mean colour."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

BACKGROUNDS: tuple[str, ...] = ("sand", "grass", "snow", "brick wall", "blue sky")


def smooth_noise(rng: np.random.Generator, size: int, cells: int, height: int | None = None) -> np.ndarray:
    """Noise in [0, 1] that varies over about `cells` cells across: a coarse random grid
    upsampled bicubically. `height` cells down, when given, stretches it (grass blades)."""
    coarse = rng.random((height or cells, cells)).astype(np.float32)
    upsampled = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(upsampled), 0, 1)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return ys, xs


def _sand(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = _grid(size)
    phase = rng.uniform(0, 2 * np.pi)
    ripples = np.sin(2 * np.pi * (ys * rng.uniform(5, 8) + 0.12 * np.sin(2 * np.pi * xs * 1.5 + phase)))
    shade = 14 * (smooth_noise(rng, size, 4) - 0.5) + 7 * ripples + 10 * rng.standard_normal((size, size))
    return np.asarray((222, 194, 146), np.float32) + shade[..., None] * np.asarray((1.0, 0.95, 0.8), np.float32)


def _grass(rng: np.random.Generator, size: int) -> np.ndarray:
    blades = smooth_noise(rng, size, size // 2, height=max(2, size // 16)) - 0.5  # long vertical streaks
    patches = smooth_noise(rng, size, 3) - 0.5
    speckle = rng.standard_normal((size, size))
    base = np.asarray((66, 138, 48), np.float32)
    light = 70 * blades + 30 * patches + 8 * speckle
    return base + light[..., None] * np.asarray((0.6, 1.0, 0.45), np.float32)


def _snow(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, _ = _grid(size)
    drifts = smooth_noise(rng, size, 3) - 0.5
    # Blue-grey shading in the hollows and toward the top, near-white on the crests.
    blue_shade = np.clip(0.45 * drifts + 0.25 * (1 - ys), 0, 1)[..., None]
    image = np.asarray((246, 248, 252), np.float32) - blue_shade * np.asarray((60, 42, 14), np.float32)
    sparkle = rng.random((size, size)) > 0.985
    image[sparkle] = 255
    return image + 3 * rng.standard_normal((size, size, 1))


def _brick_wall(rng: np.random.Generator, size: int) -> np.ndarray:
    rows = int(rng.integers(6, 9))
    brick_h = size / rows
    brick_w = 2.2 * brick_h
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    row = np.floor(ys / brick_h)
    shifted = xs + (row % 2) * brick_w / 2 + rng.uniform(0, brick_w)
    column = np.floor(shifted / brick_w)
    mortar_width = max(1.0, size / 64)
    mortar = ((ys - row * brick_h) < mortar_width) | ((shifted - column * brick_w) < mortar_width)
    # Each brick its own tone: hash row and column into a per-brick random offset.
    tones = rng.uniform(-28, 28, size=64)
    tone = tones[((row * 7 + column * 13) % 64).astype(int)]
    image = np.asarray((164, 72, 52), np.float32) + tone[..., None] * np.asarray((1.0, 0.55, 0.4), np.float32)
    image += 6 * rng.standard_normal((size, size, 1))
    image[mortar] = np.asarray((198, 192, 180), np.float32) + 6 * rng.standard_normal((int(mortar.sum()), 1))
    return image


def _blue_sky(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, _ = _grid(size)
    top, horizon = np.asarray((52, 112, 206), np.float32), np.asarray((150, 196, 240), np.float32)
    image = top + ys[..., None] * (horizon - top)
    cover = smooth_noise(rng, size, 4) * 0.7 + smooth_noise(rng, size, 8) * 0.3
    clouds = np.clip((cover - rng.uniform(0.5, 0.62)) * 4, 0, 1)[..., None]  # soft white blobs
    return image * (1 - clouds) + 250 * clouds


_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sand": _sand, "grass": _grass, "snow": _snow, "brick wall": _brick_wall, "blue sky": _blue_sky}


def background_texture(background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 image in [0, 255] of the named background."""
    return np.clip(_TEXTURES[background](rng, size), 0, 255).astype(np.float32)
