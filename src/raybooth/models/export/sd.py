"""Stable Diffusion 1.x and 2.x as one file in CompVis' ldm layout (the original v1-5-pruned and
v2-1_768 checkpoints): the UNet under model.diffusion_model., the VAE under first_stage_model.,
and the text encoder under cond_stage_model.: SD 1.x's OpenAI CLIP ViT-L/14 in transformers'
names (.transformer.), SD 2.x's OpenCLIP ViT-H/14 in OpenCLIP's (.model.). The prefixes are those
of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py.

Both versions are a StableDiffusionPipeline in diffusers; their text encoders tell them apart. The
script goes by depth (23 layers for SD 2.x), which a small model of SD 2.x's architecture does not
have; the activation does: OpenCLIP's text tower uses GELU, OpenAI's CLIP its quick GELU."""

from __future__ import annotations

from raybooth.models.export.ldm import Layout

UNET, VAE = "model.diffusion_model.", "first_stage_model."

SD1 = Layout("Stable Diffusion 1.x", "StableDiffusionPipeline",
             (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text_encoder", "cond_stage_model.transformer.", "clip")))

SD2 = Layout("Stable Diffusion 2.x", "StableDiffusionPipeline",
             (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text_encoder", "cond_stage_model.model.", "open_clip")))


def layout(text_encoder_config: dict) -> Layout:
    """SD 2.x for an OpenCLIP text encoder (GELU), else SD 1.x."""
    return SD2 if text_encoder_config.get("hidden_act") == "gelu" else SD1
