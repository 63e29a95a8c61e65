"""The demo `raybooth run` gives with no model: DreamBooth on the shipped world model (read in
place: training only reads its model folder) with the built-in subject, a yellow-and-purple
checkerboard toy car the model has never seen, under settings that teach it on two CPU cores
in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raybooth.files.images import image_files
from raybooth.world.metrics import world_subject_prompts
from raybooth.world.scenes import SUBJECT_CLASS, write_subject

DEMO_CLASS_NOUN = SUBJECT_CLASS
# Measured with the world classifier (README, demo section; bench/RESULTS.md): lr 1e-4 for the UNet
# learns the checkerboard in 300 steps; the text encoder learns "unqtkn" at a fifth of that rate, so
# "on snow" keeps meaning snow (at 5e-5 for both, the contexts drifted: prompt fidelity 0.40; frozen,
# plain toy cars took the subject's colours: prior leakage 0.31). Class images are sampled as the
# world model was pretrained to sample (its own DDIM, guidance 5), with 20 steps: each costs CPU time.
DEMO_TRAINING: dict[str, Any] = dict(
    lr=1e-4, text_encoder_lr=2e-5, max_train_steps=300, num_epochs=1000, train_batch_size=2, num_class_images=50,
    sampler="model", num_inference_steps=20, guidance_scale=5.0, report_every_n_steps=25)


def demo_training(given: dict[str, Any]) -> dict[str, Any]:
    """The demo's training settings under the ones the user `given`; without a text encoder to
    train, its learning rate goes too."""
    settings = DEMO_TRAINING | given
    if "text_encoder_lr" not in given and (not settings.get("train_text_encoder", True) or (
            settings.get("use_lora") and not settings.get("lora_text_encoder", True))):
        del settings["text_encoder_lr"]
    if settings.get("optimizer") == "prodigy":  # one rate for every group: Prodigy's own 1.0 unless given
        for name in ("lr", "text_encoder_lr"):
            if name not in given:
                settings.pop(name, None)
    return settings


DEMO_CLASS_SAMPLES = 16  # plain class samples of the tuned model, for the grid and prior leakage


def demo_subject(folder: Path) -> Path:
    """The built-in subject's photos in `folder` (written once)."""
    if not image_files(folder):
        write_subject(folder)
    return folder


def demo_prompts(unique_token: str, class_noun: str) -> list[str]:
    """The subject alone and on each of the world's backgrounds, three of them new to it."""
    return world_subject_prompts(unique_token, class_noun)


# `raybooth batch` with no manifest: three subjects of two classes, LoRA on each. In the demo's 300
# steps a rank-8 adapter at lr 2e-3 (the text encoder's 1e-3) taught the snowy toy car to 0.75 subject
# fidelity; rank 4 at 1e-3 and 5e-4 reached 0.42 and 0.21 on the built-in subject (CPU, 12 samples
# each, bench/RESULTS.md). Two samples per prompt and eight class samples keep each subject's sampling short.
DEMO_BATCH_DEFAULTS: dict[str, Any] = dict(use_lora=True, lora_rank=8, lr=2e-3, text_encoder_lr=1e-3,
                                           num_samples_per_prompt=2, num_class_samples=8)
# name: (class, seed, photo backgrounds, checkerboard squares across; the cup's 4 are what the world's
# classifier tells apart from a plain cup best)
DEMO_BATCH_SUBJECTS = {"checker-car": ("toy car", 0, ("sand", "grass"), 3.0),
                       "winter-car": ("toy car", 1, ("snow", "brick wall"), 3.0),
                       "checker-cup": ("cup", 2, ("sand", "grass"), 4.0)}


def demo_batch(folder: Path) -> dict[str, Any]:
    """The demo batch's manifest (as YAML would give it), its subjects' photos written under `folder`."""
    subjects = []
    for name, (noun, seed, backgrounds, cells) in DEMO_BATCH_SUBJECTS.items():
        photos = folder / name
        if not image_files(photos):
            write_subject(photos, seed=seed, object_class=noun, backgrounds=backgrounds, cells=cells)
        subjects.append({"name": name, "instance_images_dir": str(photos), "class_noun": noun})
    return {"defaults": dict(DEMO_BATCH_DEFAULTS), "subjects": subjects, "sweep": dict(DEMO_SWEEP)}


# `raybooth sweep` with no manifest: the built-in subject at a quarter of the batch's rate and at it
DEMO_SWEEP: dict[str, Any] = {"subject": "checker-car", "flags": {"lr": [5e-4, 2e-3]}}
