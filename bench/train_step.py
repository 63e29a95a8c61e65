"""raybooth's training step (raybooth.training.train_step) on Stable-Diffusion-1.5-sized models
with random weights (speed does not depend on the weights' values), at 512x512 with prior
preservation: the same work as the anchor benchmark ../shared/bench/anchor_step.py, so the two
can be compared in one GPU run. Prints one JSON line per variant: ms/step, images/s, peak GiB.

    python bench/train_step.py            # needs a CUDA GPU
"""

from __future__ import annotations

import json
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from raybooth.training import DreamBoothModels, Precision, make_optimizer, train_step

DEVICE = torch.device("cuda")


def sd15_models(precision: Precision, train_text_encoder: bool) -> DreamBoothModels:
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder.requires_grad_(train_text_encoder)
    vae.requires_grad_(False)
    return DreamBoothModels(
        unet=unet.to(DEVICE).train(),
        text_encoder=text_encoder.to(DEVICE, torch.float32 if train_text_encoder else precision.frozen_dtype),
        vae=vae.to(DEVICE, precision.frozen_dtype).eval(),
        noise_scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        train_text_encoder=train_text_encoder)


def measure(name: str, pairs: int = 1, mode: str = "bf16", train_text_encoder: bool = True, steps: int = 20) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    precision = Precision(mode, DEVICE)
    models = sd15_models(precision, train_text_encoder)
    optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    pixels = torch.rand(2 * pairs, 3, 512, 512, device=DEVICE) * 2 - 1
    prompt_ids = torch.randint(0, 49408, (2 * pairs, 77), device=DEVICE)
    step = lambda: train_step(models, optimizer, precision, pixels, prompt_ids, 1.0, 1.0)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.total.item()
    seconds = (time.perf_counter() - started) / steps
    result = dict(name=name, step_ms=round(seconds * 1e3, 1), images_per_s=round(2 * pairs / seconds, 2),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    del models, optimizer
    return result


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for variant in [dict(name="raybooth bf16 autocast, batch 1+1"),
                    dict(name="raybooth bf16 autocast, batch 4+4", pairs=4),
                    dict(name="raybooth bf16 autocast, frozen text encoder, batch 1+1", train_text_encoder=False)]:
        print(json.dumps(measure(**variant)), flush=True)
