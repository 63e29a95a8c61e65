"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet conditioned on its hidden states
alone, the SD VAE; noise (epsilon) or velocity (v-prediction, SD 2.x 768) prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.models.families.base import ModelFamily

if TYPE_CHECKING:
    import torch


def load_for_training(model_dir: Path, device: torch.device, text_encoder_device: torch.device,
                      frozen_dtype: torch.dtype, train_text_encoder: bool, lora: bool = False):
    """The models one training worker needs. Trained modules keep fp32 weights (autocast gives
    the speed; fp32 masters keep small updates from rounding away); frozen ones take `frozen_dtype`.
    With `lora` UNet and text encoder are frozen too: only the adapters added later (models/lora/) train."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from raybooth.models.modules import DreamBoothModels

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.to(device, frozen_dtype if lora else torch.float32)
    unet.requires_grad_(not lora)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    text_encoder.to(text_encoder_device, torch.float32 if train_text_encoder and not lora else frozen_dtype)
    text_encoder.requires_grad_(train_text_encoder and not lora)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device, frozen_dtype)
    vae.requires_grad_(False)
    unet.train()
    text_encoder.train(train_text_encoder)
    vae.eval()
    return DreamBoothModels(
        unet=unet, text_encoder=text_encoder, vae=vae,
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
        train_text_encoder=train_text_encoder)


STABLE_DIFFUSION = ModelFamily(
    name="Stable Diffusion 1.x/2.x",
    pipeline_classes=("StableDiffusionPipeline",),
    # What training and generation need; a pipeline may carry more (safety checker, feature extractor).
    components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    weighted=("unet", "vae", "text_encoder"),
    load_for_training=load_for_training,
)
