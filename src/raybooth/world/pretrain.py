"""Pretrain raybooth's world model from scratch, without Ray:

    python -m raybooth.world.pretrain --output_dir DIR [--device cuda] [--vae_steps N]
        [--unet_steps M] [--batch_size B] [--time_budget_s S] [--seed 0]

Renders the world once, trains the VAE (stage 1), sets its scaling factor from the latents,
trains UNet and text encoder on (latent, caption) pairs (stage 2), writes the pipeline folder
(fp16 safetensors, README with the command and results) and a grid of samples per class."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raybooth.world.scenes import BACKGROUNDS, CLASSES, CONTEXT_PHRASES, pretraining_scenes

SAMPLES_FILE = "samples.png"
SETTINGS_FILE = "pretraining.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults are sized for one H100: the step counts are ceilings that --time_budget_s cuts
    short (this small model is bound by kernel launches there, so big batches come nearly free)."""
    parser = argparse.ArgumentParser(prog="python -m raybooth.world.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="the pipeline folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_scenes", type=int, default=40_000, help="images rendered once and trained on")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    parser.add_argument("--vae_steps", type=int, default=5000)
    parser.add_argument("--vae_batch_size", type=int, default=256)
    parser.add_argument("--vae_learning_rate", type=float, default=4e-4)
    parser.add_argument("--kl_weight", type=float, default=1e-5, help="on the KL per latent number")
    parser.add_argument("--unet_steps", type=int, default=40_000)
    parser.add_argument("--batch_size", type=int, default=512, help="stage 2 (UNet and text encoder) batch")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="stage 2 learning rate")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="0 ships the raw weights")
    parser.add_argument("--time_budget_s", type=float, default=400.0,
                        help="wall time for both training stages together: the VAE may use at most "
                             "--vae_share of it, the UNet stage the rest")
    parser.add_argument("--vae_share", type=float, default=0.22)
    parser.add_argument("--sample_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {message}", flush=True)


def grid_prompts() -> list[str]:
    """A row per class (colour and place left to the model), then rows that name a colour and a
    place, so the grid shows both variety and prompt following."""
    plain = [f"a photo of a {name}" for name in CLASSES]
    named = [f"a photo of a red toy car {CONTEXT_PHRASES['snow']}", f"a photo of a blue ball {CONTEXT_PHRASES['grass']}",
             f"a photo of a yellow cup {CONTEXT_PHRASES['brick wall']}",
             f"a photo of a green box {CONTEXT_PHRASES['blue sky']}", f"a photo of a purple toy car {CONTEXT_PHRASES['sand']}"]
    return plain + named


def pretrain(args: argparse.Namespace) -> Path:
    from raybooth.models.output import finish_model_dir, start_model_dir
    from raybooth.world.pipeline import assemble, build_components, count_parameters, save_pipeline, training_scheduler
    from raybooth.world.pretrain_stages import (DenoiserParts, StageSettings, encode_all, train_denoiser, train_vae,
                                                unit_variance_scale)
    from raybooth.world.pretraining_data import autoencoder_scenes, caption_table, render_dataset

    started = time.monotonic()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    partial = start_model_dir(args.output_dir, args.overwrite)  # fail before an hour of work, not after

    rng = np.random.default_rng(args.seed)
    scenes = pretraining_scenes(rng, args.num_scenes)
    images = torch.from_numpy(render_dataset(scenes, workers=args.workers)).to(device)
    # The VAE learns from the world and from as many scenes of any colour and pattern.
    vae_images = torch.cat([images, torch.from_numpy(render_dataset(autoencoder_scenes(rng, args.num_scenes),
                                                                    workers=args.workers)).to(device)])
    log(f"rendered {len(vae_images)} scenes in {time.monotonic() - started:.0f}s on {args.workers} workers")

    parts = build_components(args.seed)
    log("parameters: " + ", ".join(f"{name} {count_parameters(parts[name]) / 1e6:.2f}M"
                                   for name in ("vae", "unet", "text_encoder")))
    generator = torch.Generator(device).manual_seed(args.seed)
    vae_budget = args.time_budget_s * args.vae_share
    vae_record = train_vae(parts["vae"], vae_images, StageSettings(args.vae_steps, args.vae_batch_size,
                                                               args.vae_learning_rate, vae_budget),
                           args.kl_weight, device, log, generator)
    means, stds = encode_all(parts["vae"], images, device)
    scale = unit_variance_scale(means, stds, generator)
    parts["vae"].register_to_config(scaling_factor=scale)
    log(f"latents: mean std {means.std():.3f}, posterior std {stds.mean():.4f}, scaling_factor {scale:.4f}")

    unet_budget = max(1.0, args.time_budget_s - vae_record["seconds"])  # what the VAE left unused
    captions = caption_table(scenes, parts["tokenizer"]).to(device)
    denoiser, unet_record = train_denoiser(
        DenoiserParts(parts["unet"], parts["text_encoder"], training_scheduler()), means, stds, scale, captions,
        StageSettings(args.unet_steps, args.batch_size, args.learning_rate, unet_budget), args.ema_decay, device,
        log, generator)

    pipeline = assemble(parts["vae"], denoiser.unet, denoiser.text_encoder, parts["tokenizer"])
    settings = dict(arguments={k: str(v) for k, v in vars(args).items() if k not in ("output_dir", "overwrite")},
                    vae=vae_record, unet=unet_record, scaling_factor=round(scale, 5),
                    parameters={name: count_parameters(parts[name]) for name in ("vae", "unet", "text_encoder")},
                    torch=torch.__version__, seconds=round(time.monotonic() - started, 1))
    save_pipeline(pipeline, partial, settings)
    Path(partial, SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    write_samples(partial, device, args)
    folder = finish_model_dir(partial, args.output_dir)
    log(f"wrote {folder} ({folder_bytes(folder) / 1e6:.1f} MB) in {time.monotonic() - started:.0f}s")
    return folder


def write_samples(folder: Path, device: torch.device, args: argparse.Namespace) -> None:
    """Load the written folder back (proving it loads) and sample a grid from it."""
    from diffusers import StableDiffusionPipeline

    from raybooth.world.pipeline import sample_grid

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    grid = sample_grid(pipeline, grid_prompts(), args.samples_per_prompt, args.sample_steps, args.guidance_scale,
                       args.seed)
    grid.save(folder / SAMPLES_FILE)
    log(f"samples: rows {grid_prompts()} -> {folder / SAMPLES_FILE}")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {args.device}, "
        f"{len(CLASSES)} classes on {len(BACKGROUNDS)} backgrounds")
    pretrain(args)


if __name__ == "__main__":
    main()
