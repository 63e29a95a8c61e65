"""Stable Diffusion XL (base) as one file in Stability's sgm layout (sd_xl_base_1.0.safetensors):
the UNet under model.diffusion_model. (with the pooled-text and time-id embedding as label_emb),
the VAE under first_stage_model., and the two text encoders as the conditioner's embedders: 0,
OpenAI's CLIP ViT-L/14 in transformers' names; 1, OpenCLIP ViT-bigG/14 in OpenCLIP's, its
projection included. The prefixes are those of diffusers' scripts/convert_diffusers_to_original_sdxl.py."""

from __future__ import annotations

from raybooth.models.export.ldm import Layout
from raybooth.models.export.sd import UNET, VAE

SDXL = Layout("Stable Diffusion XL", "StableDiffusionXLPipeline",
              (("unet", UNET, "unet"), ("vae", VAE, "vae"),
               ("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
               ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")))
