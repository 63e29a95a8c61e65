"""The shipped world classifier on scenes it never saw, clean and degraded as diffusion samples
are; and the training command's mechanics at a toy scale."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from raybooth.errors import RayboothError
from raybooth.world.classifier import (
    TrainSettings,
    load_classifier,
    main,
    save_classifier,
    settings_path,
    train_classifier,
)
from raybooth.world.classifier_data import CONTENTS, UNLABELLED, labels_of, mixed_items, mixed_scenes, render_item
from raybooth.world.scenes import BACKGROUNDS, CLASSES, SUBJECT_CLASS, SUBJECT_COLORS, random_scene, render

# Seeds far from the training (0) and held-out (10000) sets.
FRESH_SEED = 424242


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def fresh_scenes():
    scenes = mixed_scenes(np.random.default_rng(FRESH_SEED), 240)
    return scenes, [render(scene) for scene in scenes]


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise as a sample of a small diffusion model shows them, made with PIL and numpy
    rather than the training augmentation, so the test does not grade the augmentation by itself."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2))), float)
    noisy = blurred + rng.normal(0, rng.uniform(4, 14), blurred.shape) + rng.normal(0, 6, (1, 1, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def accuracies(classifier, scenes, images) -> dict[str, float]:
    predicted, truth = classifier.predict(np.stack(images)), labels_of(scenes)
    return {head: float((predicted[head] == truth[head].numpy()).mean()) for head in ("class", "subject", "background")}


def test_the_shipped_classifier_knows_fresh_renders(classifier, fresh_scenes):
    for head, accuracy in accuracies(classifier, *fresh_scenes).items():
        assert accuracy > 0.95, head


def test_the_shipped_classifier_knows_blurred_noisy_renders(classifier, fresh_scenes):
    rng = np.random.default_rng(7)
    scenes, images = fresh_scenes
    for head, accuracy in accuracies(classifier, scenes, [degrade(image, rng) for image in images]).items():
        assert accuracy > 0.93, head


def test_the_subject_is_its_pattern_not_its_colours(classifier):
    rng = np.random.default_rng(99)
    lookalikes = [render(dataclasses.replace(random_scene(rng, SUBJECT_CLASS), color=SUBJECT_COLORS[i % 2]))
                  for i in range(30)]
    assert classifier.predict(np.stack(lookalikes))["subject"].mean() <= 1 / 30


def test_predict_takes_any_size_and_no_images(classifier):
    scene = random_scene(np.random.default_rng(5), "cup", "snow")
    large = render(scene, size=128)
    predicted = classifier.predict([large, render(scene)])
    assert list(predicted["class"]) == [CLASSES.index("cup")] * 2
    assert list(predicted["background"]) == [BACKGROUNDS.index("snow")] * 2
    assert predicted["subject"].dtype == bool and ((0 <= predicted["subject_probability"]) &
                                                   (predicted["subject_probability"] <= 1)).all()
    assert all(len(values) == 0 for values in classifier.predict([]).values())


def test_the_shipped_classifier_tells_objects_backdrops_and_noise_apart_on_fresh_items(classifier):
    """What the shipped record claims of its held-out set, measured anew: every head, the content
    head (object, bare background, or noise) included, on fresh renders of the whole mix, clean
    and degraded."""
    rng = np.random.default_rng(FRESH_SEED + 1)
    items = mixed_items(rng, 240)
    clean = [render_item(item) for item in items]
    truth = {head: labels.numpy() for head, labels in labels_of(items).items()}
    assert {CONTENTS[index] for index in truth["content"]} == set(CONTENTS)  # noise and backdrops among them
    for kind, images, floor in (("clean", clean, 0.95), ("degraded", [degrade(image, rng) for image in clean], 0.93)):
        predicted = classifier.predict(np.stack(images))
        for head in ("class", "subject", "background", "color", "content"):
            known = truth[head] != UNLABELLED
            assert (predicted[head][known] == truth[head][known]).mean() > floor, (kind, head)


def test_training_is_reproducible_and_round_trips(tmp_path, capsys):
    toy = ["--steps", "2", "--batch_size", "8", "--train_scenes", "24", "--test_scenes", "8", "--width", "4"]
    main(toy + ["--output", str(tmp_path / "a.safetensors")])
    main(toy + ["--output", str(tmp_path / "b.safetensors")])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["width"] == 4 and record["training"]["steps"] == 2
    assert set(record["held_out_accuracy"]["clean"]) >= {"class", "subject", "background", "subject_recall"}

    model, held_out = train_classifier(TrainSettings(steps=1, batch_size=4, train_scenes=8, test_scenes=4, width=4),
                                       say=lambda line: None)
    save_classifier(model, held_out, TrainSettings(width=4), tmp_path / "c.safetensors")
    images = np.stack([render(random_scene(np.random.default_rng(i))) for i in range(3)])
    loaded = load_classifier(tmp_path / "c.safetensors")
    for head, values in model.predict(images).items():
        assert np.array_equal(values, loaded.predict(images)[head])


def test_a_missing_or_stale_classifier_is_refused(tmp_path):
    with pytest.raises(RayboothError, match="no world classifier"):
        load_classifier(tmp_path / "none.safetensors")
    model, held_out = train_classifier(TrainSettings(steps=1, batch_size=4, train_scenes=8, test_scenes=4, width=4),
                                       say=lambda line: None)
    path = tmp_path / "stale.safetensors"
    save_classifier(model, held_out, TrainSettings(width=4), path)
    record = json.loads(settings_path(path).read_text())
    record["labels"]["background"] = ["sand", "moon"]
    settings_path(path).write_text(json.dumps(record))
    with pytest.raises(RayboothError, match="other background labels"):
        load_classifier(path)
