"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet conditioned on its last hidden
states alone, the SD VAE; noise (epsilon) or velocity (v-prediction, SD 2.x 768) prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybooth.models.families.base import ModelFamily

if TYPE_CHECKING:
    import torch


def encode_text(encoders: list, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The last hidden states of the one CLIP encoder, as StableDiffusionPipeline conditions on them."""
    return encoders[0](prompt_ids)[0], None


STABLE_DIFFUSION = ModelFamily(
    name="Stable Diffusion 1.x/2.x",
    key="sd",
    pipeline_classes=("StableDiffusionPipeline",),
    # What training and generation need; a pipeline may carry more (safety checker, feature extractor).
    components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    weighted=("unet", "vae", "text_encoder"),
    tokenizers=("tokenizer",),
    text_encoders=(("text_encoder", "CLIPTextModel"),),
    encode_text=encode_text,
)
