"""An SD-1.5-sized pipeline with random weights, built offline from configs: UNet 320/640/1280/1280
with cross-attention 768, CLIP ViT-L/14 text encoder, SD's VAE, PNDM, and raybooth's offline
tokenizer. Speed does not depend on the weights' values, so benchmarks run on it.

    python bench/sd15.py OUT_DIR      # writes a diffusers pipeline folder
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from raybooth.models.output import write_model_dir
from raybooth.models.tiny import SCHEDULER, build_tokenizer


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)


def sd15_text_encoder(bos_token_id: int = 49406, eos_token_id: int = 49407) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id))


def sd15_vae(sample_size: int = 512, **settings) -> AutoencoderKL:
    """SD's VAE (SDXL's has the same architecture: bench/sdxl.py gives its settings)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **settings)


def sd15_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    # The offline tokenizer's ids are few; the text encoder keeps CLIP's full vocabulary size.
    text_encoder = sd15_text_encoder(tokenizer.bos_token_id, tokenizer.eos_token_id)
    return StableDiffusionPipeline(
        vae=sd15_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=sd15_unet(),
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def write_sd15_model(output_dir: Path) -> Path:
    pipeline = sd15_pipeline()
    return write_model_dir(Path(output_dir), lambda folder: pipeline.save_pretrained(folder), overwrite=True)


if __name__ == "__main__":
    print(write_sd15_model(Path(sys.argv[1])))
