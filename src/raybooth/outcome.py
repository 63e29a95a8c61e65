"""What `raybooth run` ends with: a picture and numbers, in the work folder.

    results.png       rows: the subject's photos; for each sample prompt, the pretrained model's
                      samples (left) and the tuned model's (right) from the same seeds; then plain
                      class samples from the tuned model
    evaluation.json   the measures of `raybooth evaluate` for the pretrained model ("before") and
                      the tuned one ("after"): the small world's with the world model, CLIP and
                      DINO's with --clip_model_dir; none for other models (the grid only)

The samples come from `raybooth evaluate`'s functions: no second sampling or measuring code.
(The training report, report.png and metrics.json, lives beside the tuned model instead.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from raybooth.config import TrainConfig
from raybooth.config.evaluate import EvaluateConfig
from raybooth.evaluate import clear_samples, image_grid, json_ready, make_samples, measure, report
from raybooth.generate import image_name
from raybooth.images import find_images, read_rgb
from raybooth.log import log

GRID_FILE, EVALUATION_FILE = "results.png", "evaluation.json"
BEFORE_DIR, CLASS_DIR = "images-before", "images-class"
LABEL_WIDTH, HEADER_HEIGHT, GAP = 150, 14, 2


@dataclass
class Outcome:
    """How the run should be shown and judged."""

    work_dir: Path
    class_noun: str
    unique_token: str
    prompts: list[str]  # the sample prompts the tuned model was sampled with, in images-new/
    samples_per_prompt: int
    num_class_samples: int
    metrics: str | None  # "world", "clip" or None (the grid only)
    clip_model_dir: Path | None = None
    dino_model_dir: Path | None = None


def finish_run(outcome: Outcome, train_cfg: TrainConfig, samples_dir: Path) -> dict | None:
    """Sample the pretrained model with the tuned model's prompts and seeds and the tuned model
    with the plain class prompt, draw the grid, and measure both models when `outcome.metrics`
    says how. Returns what evaluation.json holds (None without measures)."""
    base_dir = Path(train_cfg.model_dir)
    adapter = Path(train_cfg.output_dir) if train_cfg.use_lora else None
    tuned_dir = base_dir if adapter else Path(train_cfg.output_dir)

    def settings(model_dir: Path, seed: int, lora_weights_dir: Path | None = None) -> EvaluateConfig:
        return EvaluateConfig(
            model_dir=model_dir, instance_images_dir=train_cfg.instance_images_dir, class_noun=outcome.class_noun,
            unique_token=outcome.unique_token, num_samples=outcome.samples_per_prompt,
            num_class_samples=outcome.num_class_samples, metrics=outcome.metrics,
            clip_model_dir=outcome.clip_model_dir, dino_model_dir=outcome.dino_model_dir,
            lora_weights_dir=lora_weights_dir, num_inference_steps=train_cfg.num_inference_steps,
            guidance_scale=train_cfg.guidance_scale, seed=seed, batch_size=train_cfg.sample_batch_size,
            use_gpu=train_cfg.use_gpu, address=train_cfg.address, verbose=train_cfg.verbose)

    # The workers sampled the tuned model with seeds from train_cfg.seed; the same seeds give the
    # pretrained model's samples of the same prompts: each pair of cells differs by training only.
    before_cfg = settings(base_dir, train_cfg.seed)
    # Class samples from another seed than the class images trained on: the prior is judged on
    # noise it was not taught to turn back into those images.
    after_cfg = settings(tuned_dir, train_cfg.seed + 1, adapter)
    for folder in (outcome.work_dir / BEFORE_DIR, outcome.work_dir / CLASS_DIR):
        clear_samples(folder)  # an earlier run's samples would pass for this one's
    log(f"sampling the pretrained model with the same prompts and seeds, and {outcome.num_class_samples} plain "
        f"class samples from the tuned model, for {outcome.work_dir / GRID_FILE}")
    count = outcome.samples_per_prompt
    before = make_samples(before_cfg, base_dir, {prompt: count for prompt in outcome.prompts},
                          outcome.work_dir / BEFORE_DIR)
    plain = train_cfg.class_prompt
    class_after = make_samples(after_cfg, tuned_dir, {plain: outcome.num_class_samples},
                               outcome.work_dir / CLASS_DIR)[plain]
    after = {prompt: [read_rgb(samples_dir / image_name(prompt, index)) for index in range(count)]
             for prompt in outcome.prompts}
    photos = [read_rgb(path) for path in find_images(train_cfg.instance_images_dir, "instance images")]
    draw_grid(outcome.work_dir / GRID_FILE, photos, outcome.prompts, before, after, class_after)
    log(f"before and after: {outcome.work_dir / GRID_FILE}")
    if outcome.metrics is None:
        return None

    # The pretrained model's class samples are the class images it made for prior preservation.
    made = (Path(train_cfg.class_images_dir) / image_name(plain, index) for index in range(outcome.num_class_samples))
    class_before = [read_rgb(path) for path in made if path.exists()]
    subject_prompts = [prompt for prompt in outcome.prompts for _ in range(count)]
    results = {name: json_ready(measure(cfg, [image for prompt in outcome.prompts for image in samples[prompt]],
                                        subject_prompts, classes, photos))
               for name, cfg, samples, classes in (("before", before_cfg, before, class_before),
                                                   ("after", after_cfg, after, class_after))}
    results["settings"] = {"metrics": outcome.metrics, "class_noun": outcome.class_noun,
                           "unique_token": outcome.unique_token, "subject_prompts": outcome.prompts,
                           "samples_per_prompt": count, "class_prompt": plain,
                           "num_class_samples": outcome.num_class_samples,
                           "num_inference_steps": train_cfg.num_inference_steps,
                           "guidance_scale": train_cfg.guidance_scale, "seed": train_cfg.seed,
                           "class_samples_seed": after_cfg.seed}
    (outcome.work_dir / EVALUATION_FILE).write_text(json.dumps(results, indent=2) + "\n")
    for name in ("before", "after"):
        log(f"{name} ({'pretrained' if name == 'before' else 'tuned'} model):\n{report(results[name])}")
    log(f"the measures: {outcome.work_dir / EVALUATION_FILE}")
    return results


def draw_grid(path: Path, photos: list[np.ndarray], prompts: list[str], before: dict[str, list[np.ndarray]],
              after: dict[str, list[np.ndarray]], class_after: list[np.ndarray]) -> None:
    """evaluate's image grid, with a label for each row and a header over the before and after
    halves. Every cell takes the samples' size; a blank cell parts before from after."""
    size = next(iter(after.values()))[0].shape[0]
    count = len(next(iter(after.values())))
    blank = np.full((size, size, 3), 255, np.uint8)
    columns = 2 * count + 1
    rows = [photos[:columns]] + [before[prompt] + [blank] + after[prompt] for prompt in prompts]
    rows += [class_after[i:i + columns] for i in range(0, len(class_after), columns)]
    labels = ["the subject's photos"] + prompts + ["plain class, after"] + [""] * (len(rows) - len(prompts) - 2)
    grid = image_grid(rows, size, GAP)
    sheet = Image.new("RGB", (LABEL_WIDTH + grid.width, HEADER_HEIGHT + grid.height), "white")
    sheet.paste(grid, (LABEL_WIDTH, HEADER_HEIGHT))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    half = count * (size + GAP)
    draw.text((LABEL_WIDTH + GAP, 1), "before: pretrained model", fill="black", font=font)
    draw.text((LABEL_WIDTH + GAP + half + size + GAP, 1), "after: tuned model, same seeds", fill="black", font=font)
    for index, label in enumerate(labels):
        top = HEADER_HEIGHT + GAP + index * (size + GAP)
        for line_number, line in enumerate(wrap(label, font, LABEL_WIDTH - 6)[:size // 12]):
            draw.text((3, top + line_number * 12), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
