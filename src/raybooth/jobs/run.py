"""`raybooth run`: the whole DreamBooth job of Ray's example in one command, laid out as its
script lays it out under one work folder:

    model-orig/     the pretrained pipeline, cached from the hub (the demo reads the world model
                    that ships with raybooth in place)
    images-own/     the subject's photos (the built-in checkerboard toy car for the demo)
    images-reg/     class images generated for prior preservation (unless --class_images_dir)
    model-tuned/    the fine-tuned pipeline (with --use_lora: the LoRA adapter, for model-orig/)
    images-new/     samples of the subject from the fine-tuned pipeline
    images-before/  the same prompts and seeds from the pretrained pipeline
    images-class/   plain class samples from the fine-tuned pipeline
    results.png     all of them side by side; evaluation.json, the measures (outcome.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raybooth.config import RunConfig, TrainConfig
from raybooth.driver.training import train
from raybooth.errors import RayboothError
from raybooth.files.images import image_files
from raybooth.jobs.outcome import Outcome, finish_run, outcome_samples
from raybooth.models.folders import resolve_model_dir
from raybooth.models.hub import cache_model
from raybooth.models.output import check_output_dir
from raybooth.models.prompts import class_prompt, instance_prompt, sample_prompts
from raybooth.terminal.log import log
from raybooth.world import model_dir as world_model_dir
from raybooth.world.demo import DEMO_CLASS_NOUN, DEMO_CLASS_SAMPLES, demo_prompts, demo_subject, demo_training
from raybooth.world.scenes import CLASSES as WORLD_CLASSES

OWN_MODEL_CLASS_SAMPLES = 8  # a row of the grid


@dataclass
class RunPlan:
    """One subject's job, decided: its work folder, its training settings, and what it ends with."""

    work_dir: Path
    train: TrainConfig
    outcome: Outcome


def run(cfg: RunConfig, training: dict[str, Any]) -> Path:
    """Run every step; `training` holds the TrainConfig settings the user gave. Returns the work folder."""
    plan = plan_run(cfg, training)
    if cfg.uses_world_model:
        log(f"no model given: running the demo on the built-in world model in {plan.work_dir}")
    carry_out(plan)
    return plan.work_dir


def plan_run(cfg: RunConfig, training: dict[str, Any], local_mode: bool | None = None) -> RunPlan:
    """The job `run` would do, checked and laid out, with the pretrained model cached; nothing trained yet.
    `local_mode` is --local_mode's value for the training (`raybooth batch` runs each subject in its own process)."""
    if cfg.model_name and cfg.model_dir:
        raise RayboothError("give --model_name (to cache a model) or --model_dir (to use one), not both")
    if cfg.instance_images_dir and not cfg.class_noun:
        raise RayboothError('--class_noun is required with --instance_images_dir: the class of the subject, '
                            'such as "dog"')
    work_dir = Path(cfg.work_dir or ("raybooth-demo" if cfg.uses_world_model else "raybooth-run")).absolute()
    tuned_dir = work_dir / "model-tuned"
    check_output_dir(tuned_dir, cfg.overwrite)
    noun = cfg.class_noun or DEMO_CLASS_NOUN
    prompts = cfg.sample_prompts or (demo_prompts if cfg.uses_world_model else sample_prompts)(cfg.unique_token, noun)
    ending = outcome(cfg, work_dir, noun, prompts)
    train_cfg = TrainConfig(
        model_dir=pretrained_model(cfg, work_dir / "model-orig"), output_dir=tuned_dir,
        instance_images_dir=cfg.instance_images_dir or demo_subject(work_dir / "images-own"),
        instance_prompt=instance_prompt(cfg.unique_token, noun),
        class_images_dir=Path(cfg.class_images_dir or work_dir / "images-reg").absolute(),
        class_prompt=class_prompt(noun), class_noun=noun, overwrite=cfg.overwrite,
        sample_prompts=prompts, num_samples_per_prompt=cfg.num_samples_per_prompt, samples_dir=work_dir / "images-new",
        **(demo_training(training) if cfg.uses_world_model else training),
        **({} if local_mode is None else {"local_mode": local_mode}))
    return RunPlan(work_dir, train_cfg, ending)


def carry_out(plan: RunPlan) -> dict | None:
    """Train, sample and measure as `plan` says; what evaluation.json holds (None without measures)."""
    train_cfg, samples_dir = plan.train, Path(plan.train.samples_dir)
    # Samples of an earlier tuned model would pass for this one's: clear them first.
    for stale in image_files(samples_dir):
        stale.unlink()
    # The workers sample the tuned model while it is still in memory: no second load.
    train(train_cfg, outcome_samples(plan.outcome, train_cfg))
    measures = finish_run(plan.outcome, train_cfg, samples_dir)
    tuned_dir = train_cfg.output_dir
    if train_cfg.use_lora:
        log(f"done. LoRA adapter: {tuned_dir}, for the base model {train_cfg.model_dir}; sample it with "
            f"`raybooth generate --model_dir {train_cfg.model_dir} --lora_weights_dir {tuned_dir} "
            f"--output_dir OUT --prompts PROMPT`")
    else:
        log(f"done. Fine-tuned pipeline: {tuned_dir}")
    log(f"{len(image_files(samples_dir))} samples of {train_cfg.instance_prompt!r} and other scenes: {samples_dir}")
    return measures


def pretrained_model(cfg: RunConfig, cache_dir: Path) -> Path:
    if cfg.model_dir:
        return resolve_model_dir(cfg.model_dir)
    if cfg.model_name:
        return cache_model(cfg.model_name, cfg.revision, cache_dir)
    return world_model_dir()  # read in place: training and sampling only read a model folder


def outcome(cfg: RunConfig, work_dir: Path, noun: str, prompts: list[str]) -> Outcome:
    """What the run ends with: the world's measures in the demo, CLIP and DINO's when given."""
    if cfg.clip_model_dir or cfg.dino_model_dir:
        if not (cfg.clip_model_dir and cfg.dino_model_dir):
            raise RayboothError("--clip_model_dir and --dino_model_dir go together: the measures need both")
        metrics = "clip"
    else:
        metrics = "world" if cfg.uses_world_model and noun in WORLD_CLASSES else None
    class_samples = cfg.num_class_samples or (DEMO_CLASS_SAMPLES if cfg.uses_world_model else OWN_MODEL_CLASS_SAMPLES)
    return Outcome(work_dir, noun, cfg.unique_token, prompts, cfg.num_samples_per_prompt, class_samples, metrics,
                   cfg.clip_model_dir, cfg.dino_model_dir)
