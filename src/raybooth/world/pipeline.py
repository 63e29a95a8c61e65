"""The world model's architecture: a Stable-Diffusion-layout pipeline small enough to fine-tune
on a laptop CPU (UNet ~5 M parameters on 16x16x4 latents, VAE 64 px -> 16x16x4, a 4-layer CLIP
text encoder over raybooth's offline character-level tokenizer), and how it is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raybooth.models.tiny import build_tokenizer

RESOLUTION = 64
# SD 1.x's noise schedule, so the world model trains and samples the way SD does. Sampling uses
# DDIM: deterministic and good at ~25 steps; DDPMScheduler reads the same file for training.
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", clip_sample=False)
SAMPLER = dict(NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)
TEXT_HIDDEN = 192  # also the UNet's cross-attention width


def build_vae() -> torch.nn.Module:
    """64x64x3 <-> 16x16x4: two halvings, so 12x fewer numbers (SD's VAE keeps 48x fewer): the
    world's images are small, and the subject's checkerboard must survive the round trip."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=RESOLUTION)


def build_unet() -> torch.nn.Module:
    """SD's layout (cross-attention at the two finer levels and the middle) at ~4.9 M parameters,
    sized so a few hundred DreamBooth steps take a couple of minutes on two CPU cores."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 96, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=16)


def build_text_encoder(tokenizer) -> torch.nn.Module:
    """Four layers: the tokenizer is character-level, so the encoder itself must put letters
    together into words ("toy car", "brick wall")."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_components(seed: int = 0) -> dict:
    """Freshly initialised parts, keyed by their pipeline component names."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return dict(vae=build_vae(), unet=build_unet(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer)


def assemble(vae, unet, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SAMPLER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the full context, exactly as the SD pipeline and raybooth's trainer do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def save_pipeline(pipeline, folder: Path, settings: dict) -> Path:
    """The pipeline in fp16 safetensors (half the bytes; raybooth casts on load), plus a README
    that says how it was made."""
    pipeline.to(torch.float16)
    pipeline.save_pretrained(folder, safe_serialization=True)
    Path(folder, "README.md").write_text(readme(settings))
    return Path(folder)


def readme(settings: dict) -> str:
    command = "python -m raybooth.world.pretrain " + " ".join(
        f"--{key} {value}" for key, value in settings.get("arguments", {}).items() if value is not None)
    return (
        "# raybooth world model\n\n"
        "A small Stable-Diffusion-architecture pipeline (diffusers layout), pretrained from scratch on\n"
        "raybooth's procedural world (`raybooth.world.scenes`): toy cars, balls, cups and boxes in eight\n"
        "colours on five backgrounds, 64x64 px, captioned like \"a photo of a red toy car on sand\".\n"
        "It has never seen the built-in subject (a yellow-purple checkerboard toy car).\n\n"
        f"Made with:\n\n    {command}\n\nSettings and results:\n\n```json\n{json.dumps(settings, indent=2)}\n```\n")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def sample_grid(pipeline, prompts: list[str], per_prompt: int, steps: int = 25, guidance: float = 5.0,
                seed: int = 0) -> Image.Image:
    """One row per prompt, `per_prompt` samples across, from fixed seeds."""
    device = pipeline.device
    generator = torch.Generator("cpu").manual_seed(seed)
    rows = []
    for prompt in prompts:
        latents = torch.randn((per_prompt, 4, RESOLUTION // 4, RESOLUTION // 4), generator=generator)
        images = pipeline([prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                          height=RESOLUTION, width=RESOLUTION, latents=latents.to(device, pipeline.unet.dtype),
                          output_type="np").images
        rows.append(np.concatenate(list(images), axis=1))
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(grid)
