"""What one model family is to the rest of raybooth: the small interface a family module fills in.
The training loop, generation and the driver ask a family for what differs between families (its
pipeline class, the components a folder must hold, how its parts load for training) and never name
a family themselves, so a new family is one more module here, not a fork of the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str  # as messages name it, e.g. "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...]  # the model_index.json `_class_name`s of its folders
    components: tuple[str, ...]  # the components training and generation load
    weighted: tuple[str, ...]  # those of them that hold weights (a config.json and weight files)
    # (model_dir, device, text_encoder_device, frozen_dtype, train_text_encoder, lora) -> DreamBoothModels
    load_for_training: Callable[[Path, torch.device, torch.device, torch.dtype, bool, bool], object]

    def pipeline_class(self):
        """The diffusers pipeline class that generates with this family's folders."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])
