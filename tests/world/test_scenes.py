"""The procedural world: deterministic, every class and background drawn distinctly, captions
that say what is shown, and a subject that pretraining never sees."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image

from raybooth.world import scenes
from raybooth.world.scenes import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    SUBJECT_CLASS,
    SUBJECT_PATTERN,
    Scene,
    caption,
    context_of,
    pretraining_scenes,
    random_scene,
    render,
    subject_scene,
    write_subject,
)


def test_the_world_has_the_promised_vocabulary():
    assert CLASSES == ("toy car", "ball", "cup", "box")
    assert len(COLORS) == 8 and len(BACKGROUNDS) == 5
    assert SUBJECT_CLASS in CLASSES


def test_scenes_and_pixels_are_deterministic():
    first = pretraining_scenes(np.random.default_rng(3), 5)
    assert first == pretraining_scenes(np.random.default_rng(3), 5)
    assert first != pretraining_scenes(np.random.default_rng(4), 5)
    assert all(np.array_equal(render(scene), render(scene)) for scene in first)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_gives_uint8_images_of_the_asked_size(size):
    image = render(random_scene(np.random.default_rng(0)), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_the_object_stays_in_the_frame():
    for scene in pretraining_scenes(np.random.default_rng(1), 200):
        half_w = scene.size / 2
        half_h = scene.size * scenes.ASPECT[scene.object_class] / 2
        assert half_w <= scene.x <= 1 - half_w and half_h <= scene.y <= 1 - half_h


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_each_class_has_its_own_silhouette():
    """Same colour, background, size and spot: only the shape differs, and every pair of classes
    differs in a good share of pixels."""
    images = {name: render(Scene(name, "red", "snow", 0.6, 0.5, 0.6)) for name in CLASSES}
    for a, b in itertools.combinations(CLASSES, 2):
        assert _mean_difference(images[a], images[b]) > 8, (a, b)


def test_each_background_has_its_own_look_and_texture():
    images = {name: render(Scene("ball", "red", name, 0.4, 0.5, 0.7)) for name in BACKGROUNDS}
    for a, b in itertools.combinations(BACKGROUNDS, 2):
        assert _mean_difference(images[a], images[b]) > 15, (a, b)
    for name, image in images.items():  # a texture, not a flat colour: the top rows vary
        assert image[:16].astype(np.float32).std(axis=(0, 1)).max() > 4, name


def test_each_colour_paints_the_object():
    means = {name: render(Scene("box", name, "sand", 0.6, 0.5, 0.6))[24:48, 20:40].mean(axis=(0, 1))
             for name in COLORS}
    for a, b in itertools.combinations(COLORS, 2):
        assert np.abs(means[a] - means[b]).max() > 30, (a, b)


def test_captions_name_colour_class_and_context():
    scene = Scene("toy car", "red", "sand", 0.5, 0.5, 0.6)
    assert caption(scene) == "a photo of a red toy car on sand"
    assert caption(scene, with_color=False) == "a photo of a toy car on sand"
    assert caption(scene, with_background=False) == "a photo of a red toy car"
    for scene in pretraining_scenes(np.random.default_rng(2), 50):
        text = caption(scene)
        assert scene.object_class in text and scene.color in text and context_of(text) == scene.background


def test_the_subject_is_a_known_class_in_a_held_out_pattern():
    rng = np.random.default_rng(0)
    subject = subject_scene(rng, "snow")
    assert (subject.object_class, subject.pattern, subject.background) == (SUBJECT_CLASS, SUBJECT_PATTERN, "snow")
    with pytest.raises(ValueError):
        caption(subject)
    ordinary = Scene(subject.object_class, subject.color, subject.background, subject.size, subject.x, subject.y)
    assert _mean_difference(render(subject), render(ordinary)) > 2  # the checkerboard shows
    ball = random_scene(rng, "ball", subject=True)  # another class wears the same checkerboard (the demo batch's cup)
    assert (ball.object_class, ball.pattern) == ("ball", SUBJECT_PATTERN)


def test_pretraining_never_shows_the_subject():
    assert all(scene.pattern is None for scene in pretraining_scenes(np.random.default_rng(0), 2000))


def test_pretraining_covers_every_class_colour_and_background():
    drawn = pretraining_scenes(np.random.default_rng(0), 1000)
    assert {s.object_class for s in drawn} == set(CLASSES)
    assert {s.color for s in drawn} == set(COLORS)
    assert {s.background for s in drawn} == set(BACKGROUNDS)


def test_write_subject_writes_varied_photos(tmp_path):
    paths = write_subject(tmp_path / "subject", count=5, seed=0)
    assert len(paths) == 5 and all(p.suffix == ".png" for p in paths)
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert len({image.tobytes() for image in images}) == 5
    assert [p.name for p in write_subject(tmp_path / "again", count=5, seed=0)] == [p.name for p in paths]
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(paths, sorted((tmp_path / "again").iterdir())))


@pytest.mark.parametrize("prompt, expected", [
    ("unqtkn toy car on snow", "snow"),
    ("a photo of unqtkn toy car in front of a brick wall", "brick wall"),
    ("A photo of a ball against a blue sky", "blue sky"),
    ("a cup on the GRASS", "grass"),
    ("a box on sand", "sand"),
    ("a toy car under the sky", "blue sky"),
    ("a photo of unqtkn toy car", None),
    ("a sandwich on a snowboard", None),
])
def test_context_of_finds_the_named_background(prompt, expected):
    assert context_of(prompt) == expected


def test_autoencoder_scenes_have_any_colour_and_chequers_but_never_the_subjects_pair():
    from raybooth.world.pretraining_data import autoencoder_scenes
    from raybooth.world.scenes import CHECKERBOARD, SUBJECT_COLORS

    scenes = autoencoder_scenes(np.random.default_rng(0), 600)
    chequered = [scene for scene in scenes if scene.pattern == CHECKERBOARD]
    assert 0.4 < len(chequered) / len(scenes) < 0.6 and all(scene.pattern in (None, CHECKERBOARD) for scene in scenes)
    assert any(scene.color.startswith("#") for scene in scenes) and any(scene.color in COLORS for scene in scenes)
    assert not any({scene.color, scene.second_color} == set(SUBJECT_COLORS) for scene in chequered)
    two_colours = render(chequered[0]).reshape(-1, 3)
    plain = render(dataclasses.replace(chequered[0], pattern=None)).reshape(-1, 3)
    assert len(np.unique(two_colours, axis=0)) != len(np.unique(plain, axis=0))  # the chequers are drawn
