"""The small world's measures on inputs whose answers are known: clean renders of the subject and
of ordinary objects, passed off as samples."""

import dataclasses
import math

import numpy as np
import pytest

from raybooth.world.classifier import load_classifier
from raybooth.world.metrics import (
    color_diversity,
    pixel_diversity,
    prompt_fidelity,
    world_metrics,
    world_subject_prompts,
)
from raybooth.world.scenes import (
    BACKGROUNDS,
    COLORS,
    SUBJECT_CLASS,
    SUBJECT_COLORS,
    context_of,
    random_scene,
    render,
    subject_scene,
)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def subject_renders(rng, backgrounds) -> list[np.ndarray]:
    return [render(subject_scene(rng, background)) for background in backgrounds]


def test_default_prompts_name_the_subject_and_each_context():
    prompts = world_subject_prompts("unqtkn", "toy car")
    assert prompts[0] == "a photo of unqtkn toy car" and context_of(prompts[0]) is None
    assert [context_of(prompt) for prompt in prompts[1:]] == list(BACKGROUNDS)
    assert all("unqtkn toy car" in prompt for prompt in prompts)


def test_the_subject_in_the_asked_contexts_scores_full_marks(classifier):
    rng = np.random.default_rng(101)
    prompts = world_subject_prompts("unqtkn", SUBJECT_CLASS)[1:] * 2
    samples = subject_renders(rng, [context_of(prompt) for prompt in prompts])
    ordinary_cars = [render(random_scene(rng, SUBJECT_CLASS)) for _ in range(12)]
    metrics = world_metrics(samples, prompts, ordinary_cars, SUBJECT_CLASS, classifier, instance_images=samples[:3])
    assert metrics["subject_fidelity"] == 1.0
    assert metrics["prompt_fidelity"] == 1.0
    assert metrics["prior_leakage"] == 0.0
    assert metrics["class_recognition"] == 1.0
    assert metrics["instance_recognition"] == 1.0
    assert metrics["class_diversity"] > 0.5 and metrics["class_pixel_diversity"] > 0.05
    assert metrics["per_prompt"][prompts[0]] == {"subject_fidelity": 1.0, "prompt_fidelity": 1.0, "samples": 2}


def test_ordinary_objects_are_not_the_subject_and_wrong_contexts_are_caught(classifier):
    rng = np.random.default_rng(202)
    prompts = world_subject_prompts("unqtkn", SUBJECT_CLASS)[1:]
    # Toy cars in the subject's own colours, each in the context its prompt does not name.
    lookalikes = [render(dataclasses.replace(random_scene(rng, SUBJECT_CLASS, BACKGROUNDS[(i + 1) % len(BACKGROUNDS)]),
                                             color=SUBJECT_COLORS[i % 2])) for i in range(len(prompts))]
    subjects = subject_renders(rng, [BACKGROUNDS[i % len(BACKGROUNDS)] for i in range(8)])
    metrics = world_metrics(lookalikes, prompts, subjects, SUBJECT_CLASS, classifier)
    assert metrics["subject_fidelity"] == 0.0
    assert metrics["prompt_fidelity"] == 0.0
    assert metrics["prior_leakage"] == 1.0  # every "plain toy car" came out as the subject
    balls = [render(random_scene(rng, "ball")) for _ in range(4)]
    assert world_metrics(balls, prompts[:4], balls, SUBJECT_CLASS, classifier)["class_recognition"] == 0.0


def colours(values, shown=None) -> dict[str, np.ndarray]:
    values = np.asarray(values, dtype=int)
    return {"color": values, "object": np.ones(len(values), bool) if shown is None else np.asarray(shown)}


def test_diversity_measures_on_known_inputs():
    assert color_diversity(colours(np.zeros(6))) == 0.0
    assert color_diversity(colours(np.arange(len(COLORS)).repeat(2))) == pytest.approx(1.0)
    assert 0 < color_diversity(colours([0, 0, 1, 2])) < 1
    assert color_diversity(colours([0, 0, 1, 2], shown=[True, True, False, False])) == 0.0  # only objects count
    assert math.isnan(color_diversity(colours([])))
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert pixel_diversity([black, black, black]) == 0.0
    assert pixel_diversity([black, white]) == pytest.approx(1.0)
    assert pixel_diversity([black, white, white]) == pytest.approx(2 / 3)
    assert math.isnan(pixel_diversity([black]))


def test_noise_and_empty_backgrounds_are_neither_the_subject_nor_the_class(classifier):
    """What an untrained model samples (coloured noise) must score as nothing, not as a lucky guess."""
    from raybooth.world.classifier_data import Backdrop, Junk, render_item

    rng = np.random.default_rng(303)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    noise += [render_item(Junk(seed)) for seed in range(50_000, 50_004)]
    prompts = world_subject_prompts("unqtkn", SUBJECT_CLASS)[1:4] * 3
    metrics = world_metrics(noise + noise[:1], prompts, noise, SUBJECT_CLASS, classifier)
    assert metrics["subject_fidelity"] == 0.0 and metrics["prompt_fidelity"] == 0.0
    assert metrics["prior_leakage"] == 0.0 and metrics["class_recognition"] == 0.0
    assert math.isnan(metrics["class_diversity"])  # no object, no colours to count
    backdrops = [render_item(Backdrop(background, 7)) for background in BACKGROUNDS]
    predicted = classifier.predict(backdrops)
    assert not predicted["object"].any() and predicted["scene"].all() and not predicted["subject"].any()
    assert prompt_fidelity(predicted, [f"unqtkn toy car on {background}" for background in BACKGROUNDS]) == 1.0


def test_prompts_without_a_context_leave_prompt_fidelity_undefined_and_bad_input_is_refused(classifier):
    seen = {"background": np.array([0, 1]), "scene": np.array([True, True])}
    assert math.isnan(prompt_fidelity(seen, ["a photo of unqtkn toy car"] * 2))
    assert prompt_fidelity(seen, ["unqtkn toy car on sand", "a photo of unqtkn toy car"]) == 1.0  # one names a context
    assert prompt_fidelity(seen | {"scene": np.array([False, True])}, ["unqtkn toy car on sand"] * 2) == 0.0
    image = render(random_scene(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="no 'dog'"):
        world_metrics([image], ["a unqtkn dog"], [image], "dog", classifier)
    with pytest.raises(ValueError, match="1 subject samples for 2 prompts"):
        world_metrics([image], ["a", "b"], [image], SUBJECT_CLASS, classifier)
