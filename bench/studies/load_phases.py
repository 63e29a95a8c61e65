"""Issue 5, targets 2 and 5: how a fresh process gets the model onto the GPU, phase by phase, for
generation (the pipeline, then its first batch of 16 class images) and for training (the modules
raybooth trains). One JSON line of seconds since the process started.

    python bench/studies/load_phases.py MODEL_DIR pipeline|pipeline-direct|training|training-direct

`pipeline`/`training` load as raybooth loads today (from_pretrained into CPU memory, then `.to`);
the `-direct` variants pass the dtype and the device to from_pretrained, which then reads the
safetensors files straight into GPU memory.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()
marks: dict[str, float] = {}


def mark(name: str) -> None:
    marks[name] = round(time.perf_counter() - STARTED, 2)


def pipeline(model_dir: str, direct: bool) -> None:
    import torch
    mark("import torch")
    torch.zeros(1, device="cuda")
    mark("cuda ready")
    from diffusers import StableDiffusionPipeline
    mark("import diffusers")
    from raybooth.generate.pipelines import pipeline_settings, render, use_sampler
    from raybooth.models.loading import use_flash_attention

    options = dict(safety_checker=None, requires_safety_checker=False)
    if direct:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda",
                                                       **options)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, **options).to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, "dpm++")
    use_flash_attention("cuda")
    torch.cuda.synchronize()
    mark("pipeline loaded")
    rows = [{"prompt": "a photo of a dog", "seed": seed} for seed in range(16)]
    settings = pipeline_settings(20, 7.5, 512)
    render(pipe, rows, "cuda", settings)
    mark("first batch of 16")
    render(pipe, rows, "cuda", settings)
    mark("second batch of 16")


def training(model_dir: str, direct: bool) -> None:
    import torch
    mark("import torch")
    torch.zeros(1, device="cuda")
    mark("cuda ready")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    mark("import diffusers")
    if direct:
        UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", device_map="cuda")
        mark("unet")
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", device_map="cuda")
        mark("text encoder")
        AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=torch.bfloat16, device_map="cuda")
    else:
        UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to("cuda", torch.float32)
        mark("unet")
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to("cuda", torch.float32)
        mark("text encoder")
        AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    mark("vae")


if __name__ == "__main__":
    model, variant = sys.argv[1], sys.argv[2]
    (pipeline if variant.startswith("pipeline") else training)(model, variant.endswith("-direct"))
    print(json.dumps({"variant": variant, **marks}), flush=True)
