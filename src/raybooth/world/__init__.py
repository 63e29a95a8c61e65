"""raybooth's small world: procedural scenes (scenes.py), a small Stable-Diffusion-architecture
pipeline pretrained on them (pipeline.py, pretrain.py), shipped as package data in
weights/pipeline/, and the attribute classifier that judges its samples (classifier.py)."""

from __future__ import annotations

from pathlib import Path

from raybooth.errors import RayboothError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE = "pipeline"  # in WEIGHTS_DIR, beside the classifier's files


def model_dir() -> Path:
    """The pretrained world pipeline shipped with raybooth (a diffusers folder)."""
    folder = WEIGHTS_DIR / PIPELINE
    if not (folder / "model_index.json").is_file():
        raise RayboothError(
            f"raybooth's pretrained world model is not installed ({folder} holds no model_index.json); "
            "make one with `python -m raybooth.world.pretrain --output_dir DIR` and pass --model_dir DIR")
    return folder
