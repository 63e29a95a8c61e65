"""What `raybooth run` ends with: a picture and numbers, in the work folder.

    results.png       rows: the subject's photos; for each sample prompt, the pretrained model's
                      samples (left) and the tuned model's (right) from the same seeds; then plain
                      class samples from the tuned model
    evaluation.json   the measures of `raybooth evaluate` for the pretrained model ("before") and
                      the tuned one ("after"): the small world's with the world model, CLIP and
                      DINO's with --clip_model_dir; none for other models (the grid only)

The training workers make the samples with the models they hold (outcome_samples); the
measures are `raybooth evaluate`'s.
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
from raybooth.config.fields import inference_steps
from raybooth.evaluate.measure import image_grid, json_ready, measure, report
from raybooth.files.images import SHEET_PNG, find_images, read_rgb
from raybooth.files.names import image_name
from raybooth.generate.sample_plans import SampleSet
from raybooth.terminal.log import log

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


def outcome_samples(outcome: Outcome, train_cfg: TrainConfig) -> tuple[SampleSet, SampleSet]:
    """What the training workers make for the grid, with the model they hold: the pretrained
    model's samples of the tuned model's prompts from the same seeds, before training (each pair
    of cells differs by training only), and plain class samples of the tuned model after it."""
    before = SampleSet(outcome.work_dir / BEFORE_DIR, outcome.prompts, outcome.samples_per_prompt, train_cfg.seed,
                       before_training=True, what="samples of the pretrained model")
    # Class samples from another seed than the class images trained on: the prior is judged on
    # noise it was not taught to turn back into those images.
    classes = SampleSet(outcome.work_dir / CLASS_DIR, [train_cfg.class_prompt], outcome.num_class_samples,
                        train_cfg.seed + 1, safety_checker=False, what="plain class samples")
    return before, classes


def finish_run(outcome: Outcome, train_cfg: TrainConfig, samples_dir: Path) -> dict | None:
    """Draw the grid of the samples the workers made (outcome_samples), and measure both models
    when `outcome.metrics` says how. Returns what evaluation.json holds (None without measures)."""
    base_dir = Path(train_cfg.model_dir)
    adapter = Path(train_cfg.output_dir) if train_cfg.use_lora else None
    tuned_dir = base_dir if adapter else Path(train_cfg.output_dir)

    def settings(model_dir: Path, seed: int, lora_weights_dir: Path | None = None) -> EvaluateConfig:
        return EvaluateConfig(
            model_dir=model_dir, instance_images_dir=train_cfg.instance_images_dir, class_noun=outcome.class_noun,
            unique_token=outcome.unique_token, num_samples=outcome.samples_per_prompt,
            num_class_samples=outcome.num_class_samples, metrics=outcome.metrics,
            clip_model_dir=outcome.clip_model_dir, dino_model_dir=outcome.dino_model_dir,
            lora_weights_dir=lora_weights_dir, sampler=train_cfg.sampler,
            num_inference_steps=train_cfg.num_inference_steps,
            guidance_scale=train_cfg.guidance_scale, seed=seed, batch_size=train_cfg.sample_batch_size,
            use_gpu=train_cfg.use_gpu, address=train_cfg.address, verbose=train_cfg.verbose)

    before_set, class_set = outcome_samples(outcome, train_cfg)
    before_cfg, after_cfg = settings(base_dir, before_set.seed), settings(tuned_dir, class_set.seed, adapter)
    plain = train_cfg.class_prompt
    before = {prompt: [read_rgb(path) for path in before_set.paths(prompt)] for prompt in outcome.prompts}
    class_after = [read_rgb(path) for path in class_set.paths(plain)]
    count = outcome.samples_per_prompt
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
                           "sampler": train_cfg.sampler,
                           "num_inference_steps": inference_steps(train_cfg.sampler, train_cfg.num_inference_steps),
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
    sheet.save(path, **SHEET_PNG)


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
