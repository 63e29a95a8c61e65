"""A procedural image world: toy cars, balls, cups and boxes in eight colours, on five
backgrounds, each scene a few numbers that render deterministically (numpy + PIL only).

Objects are drawn at 4x into a *label map* (main surface, shade, highlight, window, tyre,
shadow), coloured by lookup and box-downsampled, so edges are anti-aliased and a pattern (the
held-out subject's checkerboard) can replace the main colour without redrawing the shape."""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from raybooth.world.backgrounds import BACKGROUNDS, background_texture

CLASSES: tuple[str, ...] = ("toy car", "ball", "cup", "box")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (212, 32, 38), "orange": (246, 132, 22), "yellow": (246, 214, 34), "green": (38, 158, 62),
    "blue": (36, 82, 216), "purple": (128, 44, 172), "pink": (242, 122, 182), "black": (34, 34, 38)}
COLORS: tuple[str, ...] = tuple(RGB)
# How each background reads in a caption; context_of() parses these back (and the bare names).
CONTEXT_PHRASES: dict[str, str] = {
    "sand": "on sand", "grass": "on grass", "snow": "on snow",
    "brick wall": "in front of a brick wall", "blue sky": "against a blue sky"}
SUBJECT_CLASS = "toy car"
SUBJECT_PATTERN = "yellow-purple checkerboard"  # never drawn in pretraining scenes
SUBJECT_COLORS = ("yellow", "purple")
# Squares across the subject's body: each square spans 2-3.5 latent pixels (the VAE's 4x
# downsampling), coarse enough to survive the autoencoder.
SUBJECT_CELLS = 3.0
# The subject's photos show it in two places only, so the other contexts stay new to it.
SUBJECT_PHOTO_BACKGROUNDS = ("sand", "grass")
# Object height as a share of its width (size is the width as a share of the image).
ASPECT = {"toy car": 0.62, "ball": 1.0, "cup": 0.9, "box": 1.0}
SIZE_RANGE = (0.38, 0.66)
SUPERSAMPLE = 4

# Labels of the object layer; a lookup table turns them into colour and opacity.
MAIN, SHADE, LIGHT, WINDOW, TYRE, SHADOW, GLINT = range(1, 8)


@dataclass(frozen=True)
class Scene:
    object_class: str
    color: str
    background: str
    size: float  # object width, as a share of the image width
    x: float  # object centre, as shares of width and height
    y: float
    pattern: str | None = None  # None for ordinary objects; SUBJECT_PATTERN for the subject, or CHECKERBOARD
    second_color: str | None = None  # the checkerboard's other colour
    cells: float = SUBJECT_CELLS  # the checkerboard's squares across the object


def random_scene(rng: np.random.Generator, object_class: str | None = None, background: str | None = None,
                 subject: bool = False) -> Scene:
    """One scene drawn uniformly over classes, colours and backgrounds (those not given), at a
    random size and a position that keeps the whole object in the frame. A `subject` wears the
    subject's checkerboard: the built-in subject is a toy car; another class's is `raybooth batch`'s demo."""
    object_class = object_class or (SUBJECT_CLASS if subject else CLASSES[rng.integers(len(CLASSES))])
    background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if object_class not in CLASSES or background not in BACKGROUNDS:
        raise ValueError(f"unknown class {object_class!r} or background {background!r}")
    color = SUBJECT_COLORS[0] if subject else COLORS[rng.integers(len(COLORS))]
    size = float(rng.uniform(*SIZE_RANGE))
    half_w, half_h = size / 2 + 0.03, size * ASPECT[object_class] / 2 + 0.05  # margin for shadow and wheels
    x = float(rng.uniform(half_w, 1 - half_w))
    y = float(rng.uniform(max(half_h, 0.45), 1 - half_h))  # objects rest in the lower part, as on a floor
    if subject:
        return Scene(object_class, color, background, round(size, 4), round(x, 4), round(y, 4), SUBJECT_PATTERN,
                     SUBJECT_COLORS[1])
    return Scene(object_class, color, background, round(size, 4), round(x, 4), round(y, 4))


def subject_scene(rng: np.random.Generator, background: str | None = None) -> Scene:
    return random_scene(rng, SUBJECT_CLASS, background, subject=True)


def pretraining_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    """The pretraining distribution: ordinary objects only, never the subject's pattern."""
    return [random_scene(rng) for _ in range(count)]


CHECKERBOARD = "checkerboard"  # the pattern of autoencoder scenes (pretraining_data.py)


def rgb(color: str) -> tuple[int, int, int]:
    """A colour of the world by name, or any colour as #rrggbb (autoencoder scenes)."""
    if color.startswith("#"):
        return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    return RGB[color]


def caption(scene: Scene, with_color: bool = True, with_background: bool = True) -> str:
    """"a photo of a red toy car on sand". Pretraining also drops colour or background at
    random, so short prompts such as "a photo of a toy car" ask for any colour and place."""
    if scene.pattern is not None:
        raise ValueError("the subject is never captioned: pretraining must not see it")
    noun = f"{scene.color} {scene.object_class}" if with_color else scene.object_class
    place = f" {CONTEXT_PHRASES[scene.background]}" if with_background else ""
    return f"a photo of a {noun}{place}"


_CONTEXT_WORDS = sorted([(name, name) for name in BACKGROUNDS] + [("bricks", "brick wall"), ("brick", "brick wall"),
                                                                  ("sky", "blue sky")], key=lambda p: -len(p[0]))


def context_of(prompt: str) -> str | None:
    """The background a prompt names ("unqtkn toy car on snow" -> "snow"), or None."""
    text = prompt.lower()
    found = [(match.start(), background) for word, background in _CONTEXT_WORDS
             for match in re.finditer(rf"\b{re.escape(word)}\b", text)]
    return min(found)[1] if found else None


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 image; the same scene always gives the same pixels."""
    # Texture noise is seeded by the scene itself, so render() needs no generator yet varies per scene.
    rng = np.random.default_rng(zlib.crc32(repr(scene).encode()))
    image = background_texture(scene.background, size, rng)
    layer = _colorize(scene, _draw_labels(scene, size * SUPERSAMPLE))
    # Box-downsample premultiplied colour and opacity (PIL's reduce, in C): anti-aliased edges.
    small = np.asarray(Image.fromarray(layer, "RGBA").reduce(SUPERSAMPLE), dtype=np.float32)
    image = image * (1 - small[..., 3:] / 255) + small[..., :3]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _draw_labels(scene: Scene, canvas: int) -> np.ndarray:
    label_image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(label_image)
    w = scene.size * canvas
    h = w * ASPECT[scene.object_class]
    left, top = scene.x * canvas - w / 2, scene.y * canvas - h / 2
    bottom = top + h
    if scene.background != "blue sky":  # a contact shadow grounds the object; in the sky it floats
        draw.ellipse([left + 0.05 * w, bottom - 0.07 * w, left + 0.98 * w, bottom + 0.07 * w], fill=SHADOW)
    DRAWERS[scene.object_class](draw, left, top, w, h)
    return np.asarray(label_image)


def _draw_car(draw: ImageDraw.ImageDraw, left: float, top: float, w: float, h: float) -> None:
    body_top, body_bottom = top + 0.36 * h, top + 0.84 * h
    draw.polygon([(left + 0.22 * w, body_top + 1), (left + 0.34 * w, top), (left + 0.70 * w, top),
                  (left + 0.82 * w, body_top + 1)], fill=SHADE)  # cabin
    draw.polygon([(left + 0.30 * w, body_top), (left + 0.38 * w, top + 0.08 * h), (left + 0.50 * w, top + 0.08 * h),
                  (left + 0.50 * w, body_top)], fill=WINDOW)
    draw.polygon([(left + 0.54 * w, body_top), (left + 0.54 * w, top + 0.08 * h), (left + 0.67 * w, top + 0.08 * h),
                  (left + 0.75 * w, body_top)], fill=WINDOW)
    draw.rounded_rectangle([left, body_top, left + w, body_bottom], radius=0.12 * h, fill=MAIN)
    draw.rectangle([left + 0.02 * w, body_bottom - 0.12 * h, left + 0.98 * w, body_bottom - 0.04 * h], fill=SHADE)
    wheel, bottom = 0.19 * w, top + h
    for centre in (left + 0.23 * w, left + 0.77 * w):
        draw.ellipse([centre - wheel / 2, bottom - wheel, centre + wheel / 2, bottom], fill=TYRE)
        draw.ellipse([centre - wheel / 5, bottom - wheel * 0.7, centre + wheel / 5, bottom - wheel * 0.3],
                     fill=WINDOW)  # hubcap


def _draw_ball(draw: ImageDraw.ImageDraw, left: float, top: float, w: float, h: float) -> None:
    draw.ellipse([left, top, left + w, top + h], fill=SHADE)
    draw.ellipse([left + 0.02 * w, top + 0.02 * h, left + 0.9 * w, top + 0.9 * h], fill=MAIN)
    draw.ellipse([left + 0.18 * w, top + 0.14 * h, left + 0.52 * w, top + 0.44 * h], fill=LIGHT)
    draw.ellipse([left + 0.26 * w, top + 0.2 * h, left + 0.38 * w, top + 0.3 * h], fill=GLINT)


def _draw_cup(draw: ImageDraw.ImageDraw, left: float, top: float, w: float, h: float) -> None:
    body_right = left + 0.76 * w
    handle = [left + 0.6 * w, top + 0.2 * h, left + w, top + 0.66 * h]
    draw.ellipse(handle, fill=SHADE)
    draw.ellipse([handle[0] + 0.12 * w, handle[1] + 0.1 * h, handle[2] - 0.1 * w, handle[3] - 0.1 * h], fill=0)
    draw.polygon([(left, top + 0.06 * h), (body_right, top + 0.06 * h), (left + 0.66 * w, top + h),
                  (left + 0.1 * w, top + h)], fill=MAIN)  # tapered body, wide at the rim
    draw.rectangle([left + 0.05 * w, top + 0.2 * h, left + 0.16 * w, top + 0.85 * h], fill=LIGHT)
    draw.ellipse([left, top, body_right, top + 0.14 * h], fill=SHADE)  # rim
    draw.ellipse([left + 0.05 * w, top + 0.03 * h, body_right - 0.05 * w, top + 0.11 * h], fill=TYRE)  # the inside


def _draw_box(draw: ImageDraw.ImageDraw, left: float, top: float, w: float, h: float) -> None:
    depth = 0.24 * w  # an oblique cube: front face, lighter top, darker side
    front = [left, top + depth, left + w - depth, top + h]
    draw.polygon([(left, front[1]), (left + depth, top), (left + w, top), (front[2], front[1])], fill=LIGHT)
    draw.polygon([(front[2], front[1]), (left + w, top), (left + w, top + h - depth), (front[2], front[3])], fill=SHADE)
    draw.rectangle(front, fill=MAIN)
    lid = front[1] + 0.2 * (front[3] - front[1])  # the lid's lower edge, a dark line across the front
    draw.rectangle([left, lid, front[2], lid + 0.04 * h], fill=TYRE)
    draw.line([(front[2], front[1]), (left + w, top)], fill=TYRE, width=max(1, int(0.015 * w)))


DRAWERS = {"toy car": _draw_car, "ball": _draw_ball, "cup": _draw_cup, "box": _draw_box}
# Shade factors applied to the object's colour for each label, and fixed colours for the rest.
_SHADE_FACTOR = {MAIN: 1.0, SHADE: 0.72, LIGHT: 1.25}
_FIXED = {WINDOW: (178, 212, 236), TYRE: (24, 24, 26), GLINT: (255, 255, 250), SHADOW: (0, 0, 0)}
_OPACITY = {SHADOW: 0.32}


def _colorize(scene: Scene, labels: np.ndarray) -> np.ndarray:
    """The object layer as premultiplied RGBA uint8 (canvas, canvas, 4), looked up from labels."""
    table = np.zeros((8, 4), dtype=np.float32)
    base = np.asarray(rgb(scene.color), dtype=np.float32)
    for label, factor in _SHADE_FACTOR.items():
        # Black lightens for its highlight rather than staying black; other colours scale.
        table[label, :3] = np.clip(base * factor + (40 if scene.color == "black" and factor > 1 else 0), 0, 255)
        table[label, 3] = 1.0
    for label, fixed in _FIXED.items():
        table[label, 3] = _OPACITY.get(label, 1.0)
        table[label, :3] = np.asarray(fixed) * table[label, 3]
    table[:, 3] *= 255
    layer = np.round(table).astype(np.uint8)[labels]  # index a uint8 table: no float canvas to convert
    if scene.pattern is not None:
        _checkerboard(scene, labels, layer)
    return layer


def _checkerboard(scene: Scene, labels: np.ndarray, layer: np.ndarray) -> None:
    """Paint the body's every other square (scene.cells across it) in the second colour."""
    canvas = labels.shape[0]
    cell = scene.size * canvas / scene.cells
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    origin_x = scene.x * canvas - scene.size * canvas / 2
    odd = ((np.floor((xs - origin_x) / cell) + np.floor(ys / cell)) % 2).astype(bool)
    second = np.asarray(rgb(scene.second_color), dtype=np.float32)
    for label, factor in _SHADE_FACTOR.items():
        layer[(labels == label) & odd, :3] = np.round(np.clip(second * factor, 0, 255)).astype(np.uint8)


def write_subject(folder: Path, count: int = 5, seed: int = 0, size: int = 64, object_class: str = SUBJECT_CLASS,
                  backgrounds: tuple[str, ...] = SUBJECT_PHOTO_BACKGROUNDS, cells: float = SUBJECT_CELLS) -> list[Path]:
    """`count` PNGs of a subject at varied sizes and spots, in the `backgrounds` only: the built-in
    subject by default; another class wears its checkerboard, with `cells` squares across, for a
    subject of that class (`raybooth batch`'s demo)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        scene = random_scene(rng, object_class, backgrounds[index % len(backgrounds)], subject=True)
        scene = dataclasses.replace(scene, cells=cells)
        path = folder / f"subject-{index:02d}.png"
        Image.fromarray(render(scene, size)).save(path)
        paths.append(path)
    return paths
