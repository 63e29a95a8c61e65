"""`raybooth evaluate`: sample a fine-tuned model with subject prompts and the plain class prompt
(through `raybooth generate`'s Ray Data path), then measure what DreamBooth promises: the subject
comes back, in the contexts the prompts ask for, while the class keeps its variety. The small
world's classifier judges with --metrics world (raybooth/world/metrics.py); CLIP and DINO with
--metrics clip, as the paper does (judges.py). Writes metrics.json and samples.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from raybooth.config import GenerateConfig
from raybooth.config.evaluate import EvaluateConfig
from raybooth.config.fields import inference_steps
from raybooth.driver.generation import generate
from raybooth.errors import RayboothError
from raybooth.files.images import SHEET_PNG, find_images, read_rgb
from raybooth.files.names import generated_for, image_name
from raybooth.models.folders import resolve_model_dir
from raybooth.models.prompts import class_prompt
from raybooth.terminal.log import log
from raybooth.world.scenes import CLASSES

# Some of the DreamBooth paper's prompts for objects ({0}: identifier, {1}: class noun).
PAPER_PROMPTS = ("a photo of {0} {1}", "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
                 "a {0} {1} on a cobblestone street", "a {0} {1} on top of a wooden floor",
                 "a {0} {1} with a city in the background", "a red {0} {1}")


GRID_COLUMNS = 8


# What each measure means, for the printout: (label, explanation).
EXPLANATIONS = {
    "subject_fidelity": ("subject fidelity", "subject samples the classifier calls the subject; higher is better"),
    "prompt_fidelity": ("prompt fidelity", "subject samples that show the prompt's context; higher is better"),
    "prior_leakage": ("prior leakage", "plain class samples that come out as the subject; lower is better"),
    "class_recognition": ("class recognition", "plain class samples of the right class; higher is better"),
    "class_diversity": ("class diversity", "entropy of the class samples' colours, 0 to 1; higher is more varied"),
    "class_pixel_diversity": ("class pixel diversity", "mean pixel distance between class samples, 0 to 1"),
    "instance_recognition": ("instance recognition", "the subject's own photos the classifier calls the subject"),
    "dino": ("DINO", "DINO similarity of subject samples to the real photos; higher is better"),
    "clip_i": ("CLIP-I", "CLIP image similarity of subject samples to the real photos; higher is better"),
    "clip_t": ("CLIP-T", "CLIP similarity of each subject sample to its prompt; higher is better"),
    "pres": ("PRES", "DINO similarity of plain class samples to the real photos; lower is better"),
    "class_dino_diversity": ("class DINO diversity", "1 - DINO similarity between class samples; higher is more varied"),
}


def subject_prompts(cfg: EvaluateConfig) -> list[str]:
    if cfg.prompts:
        return list(cfg.prompts)
    if cfg.chosen_metrics == "world":
        from raybooth.world.metrics import world_subject_prompts

        return world_subject_prompts(cfg.unique_token, cfg.class_noun)
    return [prompt.format(cfg.unique_token, cfg.class_noun) for prompt in PAPER_PROMPTS]


def make_samples(cfg: EvaluateConfig, model_dir: Path, counts: dict[str, int], folder: Path) -> dict[str, list]:
    """`counts[prompt]` samples of each prompt, made by `raybooth generate`'s path: one Ray Data
    run (one model load per actor) for each distinct count."""
    for count in sorted(set(counts.values())):
        generate(GenerateConfig(
            model_dir=model_dir, output_dir=folder, prompts=[p for p, c in counts.items() if c == count],
            num_samples_per_prompt=count, batch_size=cfg.batch_size, sampler=cfg.sampler,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance, seed=cfg.seed, dtype=cfg.dtype, safety_checker=False,
            lora_weights_dir=cfg.lora_weights_dir, use_gpu=cfg.use_gpu, address=cfg.address, verbose=cfg.verbose))
    return {prompt: [read_rgb(folder / image_name(prompt, index)) for index in range(count)]
            for prompt, count in counts.items()}


def clear_samples(folder: Path) -> None:
    """Samples of an earlier evaluation would pass for this model's, since generate keeps what a
    folder already holds: remove the images generate wrote there (and nothing else)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and generated_for(path.name):
                path.unlink()


def measure(cfg: EvaluateConfig, samples: list[np.ndarray], prompts: list[str], class_samples: list[np.ndarray],
            real_images: list[np.ndarray]) -> dict:
    if cfg.chosen_metrics == "world":
        from raybooth.world.classifier import load_classifier
        from raybooth.world.metrics import world_metrics

        return world_metrics(samples, prompts, class_samples, cfg.class_noun, load_classifier(cfg.classifier),
                             real_images)
    from raybooth.evaluate.judges import ClipJudge, DinoJudge, paper_metrics

    return paper_metrics(samples, prompts, real_images, ClipJudge(cfg.clip_model_dir), DinoJudge(cfg.dino_model_dir),
                         cfg.unique_token, class_samples)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """The centre square of `image`, resized to `size`."""
    picture = Image.fromarray(image)
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return np.asarray(picture.crop((left, top, left + side, top + side)).resize((size, size),
                                                                               Image.Resampling.LANCZOS))


def image_grid(rows: list[list[np.ndarray]], size: int, gap: int = 2) -> Image.Image:
    """Rows of images (each made square at `size`) on a white sheet, one row per list."""
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (size + gap) + gap, len(rows) * (size + gap) + gap), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(Image.fromarray(square(image, size)), (gap + x * (size + gap), gap + y * (size + gap)))
    return sheet


def json_ready(value):
    """nan (a measure with nothing to measure) as null: JSON has no nan."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def report(metrics: dict) -> str:
    lines = []
    for key, (label, meaning) in EXPLANATIONS.items():
        if key in metrics:
            value = metrics[key]
            shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
            lines.append(f"{label:>22}  {shown:>6}  {meaning}")
    return "\n".join(lines)


def check_world_class(cfg: EvaluateConfig) -> None:
    """--metrics world's classifier knows the small world's classes and no others."""
    if cfg.chosen_metrics == "world" and cfg.class_noun not in CLASSES:
        raise RayboothError(f"--metrics world judges the small world's classes ({', '.join(CLASSES)}), "
                            f"not {cfg.class_noun!r}; for other subjects use --metrics clip with "
                            "--clip_model_dir and --dino_model_dir")


def evaluate(cfg: EvaluateConfig) -> dict:
    """Sample, measure, and write OUTPUT_DIR/metrics.json and OUTPUT_DIR/samples.png (rows: the
    subject's photos, each subject prompt's samples, then the plain class samples). Returns the
    metrics as written."""
    cfg.validate()
    check_world_class(cfg)
    model_dir = resolve_model_dir(cfg.model_dir)
    real_images = [read_rgb(path) for path in find_images(cfg.instance_images_dir, "instance images")]
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RayboothError(f"output {output_dir} is a file, not a folder")
    prompts, plain = list(dict.fromkeys(subject_prompts(cfg))), class_prompt(cfg.class_noun)
    if plain in prompts:
        raise RayboothError(f"--prompts holds the plain class prompt {plain!r}; subject prompts name the subject")
    samples_dir = output_dir / "samples"
    clear_samples(samples_dir)
    log(f"sampling {cfg.num_samples} per subject prompt ({len(prompts)} prompts) and {cfg.class_sample_count} of "
        f"{plain!r}")
    made = make_samples(cfg, model_dir, {prompt: cfg.num_samples for prompt in prompts} |
                        {plain: cfg.class_sample_count}, samples_dir)
    samples = [image for prompt in prompts for image in made[prompt]]
    class_samples = made[plain]
    log(f"judging {len(samples) + len(class_samples)} samples with the {cfg.chosen_metrics} measures")
    sample_prompts = [prompt for prompt in prompts for _ in range(cfg.num_samples)]
    metrics = json_ready(measure(cfg, samples, sample_prompts, class_samples, real_images))
    if (metrics.get("instance_recognition") or 0) < 0.5 and cfg.chosen_metrics == "world":
        log("warning: the world classifier does not see the built-in subject in --instance_images_dir; subject "
            "fidelity counts that subject only, so it says nothing about yours (use --metrics clip)")
    metrics["settings"] = {"metrics": cfg.chosen_metrics, "model_dir": str(model_dir),
                           "lora_weights_dir": cfg.lora_weights_dir and str(cfg.lora_weights_dir),
                           "class_noun": cfg.class_noun, "unique_token": cfg.unique_token,
                           "subject_prompts": prompts, "class_prompt": plain, "num_samples": cfg.num_samples,
                           "num_class_samples": cfg.class_sample_count, "sampler": cfg.sampler,
                           "num_inference_steps": inference_steps(cfg.sampler, cfg.num_inference_steps),
                           "guidance_scale": cfg.guidance, "seed": cfg.seed}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    columns = min(GRID_COLUMNS, max(cfg.num_samples, len(real_images)))
    rows = [real_images[:columns]] + [samples[i:i + cfg.num_samples][:columns]
                                      for i in range(0, len(samples), cfg.num_samples)]
    rows += [class_samples[i:i + columns] for i in range(0, min(len(class_samples), 2 * columns), columns)]
    image_grid(rows, samples[0].shape[0]).save(output_dir / "samples.png", **SHEET_PNG)
    return metrics
