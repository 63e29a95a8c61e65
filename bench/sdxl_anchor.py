"""Anchors for SDXL (issue 30): what diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py
does, replicated as ../shared/bench/anchor_step.py replicates train_dreambooth.py for SD 1.5, on a
pipeline folder (bench/sdxl.py's SDXL-sized random weights on a GPU; the tiny SDXL on a CPU to try it).

    python bench/sdxl_anchor.py step MODEL_DIR [--batch 1] [--steps 20]   # one LoRA step, as the script's
    python bench/sdxl_anchor.py generate MODEL_DIR [--batch 4] [--steps 50]   # its class images' pipeline

The step, as the script runs it with its defaults (rank 4 on the UNet's to_q/k/v/out.0, text
encoders frozen, --mixed_precision bf16): frozen UNet and text encoders in bf16, the VAE in fp32,
the LoRA weights in bf16 (the script casts them to fp32 only under fp16), the prompts encoded once,
each step's two images (instance + class) encoded by the VAE, time ids per row, the forward pass
under bf16 autocast (Accelerate's), MSE with the prior term, clipping at 1.0, AdamW (weight decay
1e-4). The generation: StableDiffusionXLPipeline in fp16 (the script's prior_generation_precision
default on a GPU), its own scheduler, 50 steps, guidance 5.0, --sample_batch_size 4. Prints JSON."""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def anchor_step(model_dir: str, batch: int, steps: int, device: str) -> dict:
    weight_dtype = torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device, weight_dtype)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device, torch.float32)
    encoders = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device, weight_dtype),
                CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2").to(device, weight_dtype)]
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    side = vae.config.sample_size
    with torch.no_grad():  # compute_text_embeddings: once, instance and class prompts
        ids = torch.randint(0, 300, (2, 77), device=device)
        hidden = [encoder(ids, output_hidden_states=True) for encoder in encoders]
        prompt_embeds = torch.cat([output.hidden_states[-2] for output in hidden], dim=-1)
        pooled = hidden[-1][0]
    prompt_embeds = prompt_embeds.repeat_interleave(batch, 0)
    pooled = pooled.repeat_interleave(batch, 0)
    pixels = torch.randn(2 * batch, 3, side, side, device=device)
    time_ids = torch.tensor([[side * 1.5, side, 0, 0, side, side]] * (2 * batch), device=device, dtype=weight_dtype)

    def step():
        with torch.autocast(device, dtype=weight_dtype):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.to(weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, prompt_embeds,
                              added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}, return_dict=False)[0]
            instance, prior = prediction.float().chunk(2)
            target_instance, target_prior = noise.float().chunk(2)
            loss = (torch.nn.functional.mse_loss(instance, target_instance)
                    + torch.nn.functional.mse_loss(prior, target_prior))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return dict(anchor="step", batch=f"{batch}+{batch}", resolution=side, step_ms=round(seconds * 1e3, 1),
                images_per_s=round(2 * batch / seconds, 2), peak_gib=peak and round(peak, 2))


def anchor_generate(model_dir: str, batch: int, steps: int, device: str) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=dtype, add_watermarker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a photo of a toy car"] * batch
    pipeline(prompts, num_inference_steps=2)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    pipeline(prompts, num_inference_steps=steps, guidance_scale=5.0)
    synchronize(device)
    seconds = time.perf_counter() - start
    return dict(anchor="generate", batch=batch, steps=steps, scheduler=type(pipeline.scheduler).__name__,
                seconds=round(seconds, 2), images_per_s=round(batch / seconds, 3),
                unet_evaluations_per_s=round(2 * batch * steps / seconds, 1))  # guidance: two rows per image


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("step", "generate"))
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.what == "step":
        result = anchor_step(args.model_dir, args.batch or 1, args.steps or 20, device)
    else:
        result = anchor_generate(args.model_dir, args.batch or 4, args.steps or 50, device)
    print(json.dumps(dict(result, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")), flush=True)
