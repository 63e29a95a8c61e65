"""Is a faster sampler as good as a 50-step one? Judged in the small world (issue 5, target 5):
the shipped world pipeline samples the same prompts from the same noise under each sampler, and
the world classifier says how many samples show what their prompt asks (class, colour,
background) and how varied the plain class prompt's samples stay. Runs on CPU in a few minutes.

    python bench/sampler_quality.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from raybooth.world import model_dir
from raybooth.world.classifier import load_classifier
from raybooth.world.metrics import color_diversity, pixel_diversity
from raybooth.world.pipeline import RESOLUTION
from raybooth.world.scenes import BACKGROUNDS, CLASSES, COLORS, CONTEXT_PHRASES

GUIDANCE = 5.0  # the world model's own (raybooth.world.demo)
CLASS_SEEDS = 24  # plain class samples per class: the prior a DreamBooth run keeps


def full_prompts() -> list[tuple[str, dict]]:
    """Every class, colour and background once: what each sample should show."""
    return [(f"a photo of a {color} {noun} {CONTEXT_PHRASES[background]}",
             dict(cls=CLASSES.index(noun), color=COLORS.index(color), background=BACKGROUNDS.index(background)))
            for noun in CLASSES for color in COLORS for background in BACKGROUNDS]


def samplers(pipeline) -> list[tuple[str, object, int]]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    config = pipeline.scheduler.config
    dpm = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return [("ddim (the world model's own)", DDIMScheduler.from_config(config), 50),
            ("pndm (SD-1.5's own)", PNDMScheduler.from_config(config), 50),
            ("dpm++ 2m", dpm, 25), ("dpm++ 2m", dpm, 20), ("dpm++ 2m", dpm, 15),
            ("ddim (control: too few steps)", DDIMScheduler.from_config(config), 5)]


def sample(pipeline, prompts: list[str], steps: int, seed: int) -> list[np.ndarray]:
    """Samples from noise that depends only on the seed and the position, whatever the sampler."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((len(prompts), 4, RESOLUTION // 4, RESOLUTION // 4), generator=generator)
    images = []
    for start in range(0, len(prompts), 40):
        chunk = slice(start, start + 40)
        out = pipeline(prompts[chunk], num_inference_steps=steps, guidance_scale=GUIDANCE, height=RESOLUTION,
                       width=RESOLUTION, latents=latents[chunk], output_type="np").images
        images += list((out * 255).round().astype(np.uint8))
    return images


def judge(classifier, pipeline, steps: int) -> dict:
    wanted = full_prompts()
    predictions = classifier.predict(sample(pipeline, [prompt for prompt, _ in wanted], steps, seed=1))
    shown = {key: np.array([truth[key] for _, truth in wanted]) for key in ("cls", "color", "background")}
    scores = {"class": float(((predictions["class"] == shown["cls"]) & predictions["object"]).mean()),
              "color": float(((predictions["color"] == shown["color"]) & predictions["object"]).mean()),
              "background": float(((predictions["background"] == shown["background"]) & predictions["scene"]).mean())}
    scores["all three"] = float(((predictions["class"] == shown["cls"]) & (predictions["color"] == shown["color"])
                                 & (predictions["background"] == shown["background"]) & predictions["object"]).mean())
    class_prompts = [f"a photo of a {noun}" for noun in CLASSES for _ in range(CLASS_SEEDS)]
    class_images = sample(pipeline, class_prompts, steps, seed=2)
    plain = classifier.predict(class_images)
    truth = np.repeat(np.arange(len(CLASSES)), CLASS_SEEDS)
    scores["class prompt recognised"] = float(((plain["class"] == truth) & plain["object"]).mean())
    scores["class colour diversity"] = color_diversity(plain)
    scores["class pixel diversity"] = pixel_diversity(class_images)
    return scores


def main() -> None:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir(), torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    rows = []
    for name, scheduler, steps in samplers(pipeline):
        pipeline.scheduler = scheduler
        started = time.perf_counter()
        scores = judge(classifier, pipeline, steps)
        rows.append(dict(sampler=name, steps=steps, seconds=round(time.perf_counter() - started, 1),
                         **{key: round(value, 3) for key, value in scores.items()}))
        print(json.dumps(rows[-1]), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            json.dump(dict(torch=torch.__version__, guidance=GUIDANCE, rows=rows), out, indent=1)


if __name__ == "__main__":
    main()
