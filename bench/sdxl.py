"""An SDXL-sized pipeline with random weights, built offline from configs: the SDXL base UNet
(320/640/1280 with 1/2/10 transformer layers, cross-attention 2048, text-time embedding),
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, SDXL's VAE, Euler, and raybooth's offline
tokenizer. Speed does not depend on the weights' values, so benchmarks run on it. Weights are
written in fp16 (5 GB rather than 10; training loads the trained ones into fp32 all the same).

    python bench/sdxl.py OUT_DIR      # writes a diffusers pipeline folder
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from raybooth.models.output import write_model_dir
from raybooth.models.tiny import build_tokenizer
from sd15 import sd15_vae


def sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def clip_config(hidden: int, layers: int, heads: int, act: str, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                          bos_token_id=bos, eos_token_id=eos)


def sdxl_vae() -> AutoencoderKL:
    return sd15_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    return StableDiffusionXLPipeline(
        vae=sdxl_vae(), unet=sdxl_unet(),
        text_encoder=CLIPTextModel(clip_config(768, 12, 12, "quick_gelu", **ids)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(1280, 32, 20, "gelu", **ids)),
        tokenizer=tokenizer, tokenizer_2=build_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False)


def write_sdxl_model(output_dir: Path) -> Path:
    pipeline = sdxl_pipeline().to(torch.float16)
    return write_model_dir(Path(output_dir), lambda folder: pipeline.save_pretrained(folder), overwrite=True)


if __name__ == "__main__":
    print(write_sdxl_model(Path(sys.argv[1])))
