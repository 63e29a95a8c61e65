"""The DreamBooth paper's measures in the small world, judged by the world classifier rather
than by CLIP and DINO, which know nothing of checkerboard toy cars:

- subject fidelity: the share of subject-prompt samples ("a photo of unqtkn toy car on snow")
  that the classifier calls the subject and of the prompt's class. Higher is better.
- prompt fidelity: the share of subject-prompt samples that name a context whose background is
  that context. Higher is better. Noise, which shows no background of the world, never counts.
- prior leakage (the prior preservation measure): the share of plain class samples ("a photo
  of a toy car") that come out as the subject. Lower is better: a model that paints the subject
  for every toy car has lost its prior.
- class recognition: the share of plain class samples that show an object, of the right class.
- class diversity: the normalised entropy of the object colours the classifier sees in the plain
  class samples: 0 when every sample has one colour, 1 when all the world's colours are equally
  common. Colour is what the world varies most, and the first thing a collapsed prior loses.
- class pixel diversity: the mean pairwise root-mean-square pixel difference of the plain class
  samples, in [0, 1] (0: all identical); it also counts position, size and background.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from raybooth.world.classifier import WorldClassifier, load_classifier
from raybooth.world.scenes import BACKGROUNDS, CLASSES, COLORS, CONTEXT_PHRASES, context_of

# The keys world_metrics returns that are shares or scores; "lower is better" for prior_leakage.
WORLD_METRICS = ("subject_fidelity", "prompt_fidelity", "prior_leakage", "class_recognition", "class_diversity",
                 "class_pixel_diversity")


def world_subject_prompts(unique_token: str, class_noun: str) -> list[str]:
    """The subject alone, then the subject in each of the world's contexts."""
    return [f"a photo of {unique_token} {class_noun}"] + [
        f"a photo of {unique_token} {class_noun} {CONTEXT_PHRASES[background]}" for background in BACKGROUNDS]


def subject_fidelity(predictions: dict[str, np.ndarray], class_noun: str) -> float:
    """The share of samples called the subject and of the class `class_noun`."""
    hits = predictions["subject"] & predictions["object"] & (predictions["class"] == CLASSES.index(class_noun))
    return float(hits.mean()) if len(hits) else math.nan


def prompt_fidelity(predictions: dict[str, np.ndarray], prompts: Sequence[str]) -> float:
    """The share of samples whose background is the context their prompt names, over the samples
    whose prompt names one (nan if none does)."""
    contexts = [context_of(prompt) for prompt in prompts]
    matches = [predictions["scene"][i] and predictions["background"][i] == BACKGROUNDS.index(context)
               for i, context in enumerate(contexts) if context is not None]
    return float(np.mean(matches)) if matches else math.nan


def prior_leakage(predictions: dict[str, np.ndarray]) -> float:
    """The share of plain class samples called the subject (lower is better)."""
    return float(predictions["subject"].mean()) if len(predictions["subject"]) else math.nan


def class_recognition(predictions: dict[str, np.ndarray], class_noun: str) -> float:
    hits = predictions["object"] & (predictions["class"] == CLASSES.index(class_noun))
    return float(hits.mean()) if len(hits) else math.nan


def color_diversity(predictions: dict[str, np.ndarray]) -> float:
    """The entropy of the predicted colours of the samples that show an object, divided by its
    largest value, log(len(COLORS))."""
    counts = np.bincount(predictions["color"][predictions["object"]], minlength=len(COLORS)).astype(float)
    if not counts.sum():
        return math.nan
    shares = counts[counts > 0] / counts.sum()
    return float(abs((shares * np.log(shares)).sum()) / math.log(len(COLORS)))  # abs: one colour is 0.0, not -0.0


def pixel_diversity(images: Sequence[np.ndarray]) -> float:
    """The mean root-mean-square difference, in [0, 1], over every pair of distinct images."""
    if len(images) < 2:
        return math.nan
    flat = np.stack([np.asarray(image, dtype=np.float64).reshape(-1) / 255 for image in images])
    squared = (flat ** 2).sum(axis=1)
    distances = np.clip(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0, None) / flat.shape[1]
    pairs = np.triu_indices(len(images), k=1)
    return float(np.sqrt(distances[pairs]).mean())


def world_metrics(subject_samples: Sequence[np.ndarray], subject_prompts: Sequence[str],
                  class_samples: Sequence[np.ndarray], class_noun: str, classifier: WorldClassifier | None = None,
                  instance_images: Sequence[np.ndarray] = ()) -> dict:
    """Every measure above for uint8 HxWx3 samples: `subject_samples[i]` made from
    `subject_prompts[i]`, `class_samples` from the plain class prompt. With `instance_images`,
    also `instance_recognition`: the share of the subject's own photos the classifier calls the
    subject, a check that the classifier knows this subject at all (it knows only the built-in one).
    `per_prompt` breaks subject and prompt fidelity down by prompt."""
    if class_noun not in CLASSES:
        raise ValueError(f"the small world has no {class_noun!r}; its classes are {', '.join(CLASSES)}")
    if len(subject_samples) != len(subject_prompts):
        raise ValueError(f"{len(subject_samples)} subject samples for {len(subject_prompts)} prompts")
    classifier = classifier or load_classifier()
    judged = classifier.predict(list(subject_samples))
    plain = classifier.predict(list(class_samples))
    metrics: dict = {
        "subject_fidelity": subject_fidelity(judged, class_noun),
        "prompt_fidelity": prompt_fidelity(judged, subject_prompts),
        "prior_leakage": prior_leakage(plain),
        "class_recognition": class_recognition(plain, class_noun),
        "class_diversity": color_diversity(plain),
        "class_pixel_diversity": pixel_diversity(class_samples),
    }
    if len(instance_images):
        metrics["instance_recognition"] = subject_fidelity(classifier.predict(list(instance_images)), class_noun)
    metrics["per_prompt"] = {}
    for prompt in dict.fromkeys(subject_prompts):
        rows = np.asarray([i for i, p in enumerate(subject_prompts) if p == prompt])
        mine = {name: values[rows] for name, values in judged.items()}
        metrics["per_prompt"][prompt] = {"subject_fidelity": subject_fidelity(mine, class_noun),
                                         "prompt_fidelity": prompt_fidelity(mine, [prompt] * len(rows)),
                                         "samples": len(rows)}
    return metrics
