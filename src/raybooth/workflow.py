"""`raybooth run`: the whole DreamBooth job of Ray's example in one command, laid out as its
script lays it out under one work folder:

    model-orig/   the pretrained pipeline (cached from the hub, or the built-in tiny model)
    images-own/   the subject's photos (the built-in toy car for the demo)
    images-reg/   class images generated for prior preservation
    model-tuned/  the fine-tuned pipeline (with --use_lora: the LoRA adapter, for model-orig/)
    images-new/   samples of the subject from the fine-tuned pipeline
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raybooth.config import RunConfig, TrainConfig
from raybooth.errors import RayboothError
from raybooth.hub import cache_model
from raybooth.images import image_files
from raybooth.log import log
from raybooth.models import check_output_dir, resolve_model_dir
from raybooth.prompts import class_prompt, instance_prompt, sample_prompts
from raybooth.tiny import write_demo_subject, write_tiny_model
from raybooth.trainer import train

DEMO_CLASS_NOUN = "toy car"
# The demo trains the tiny model hard enough in about a minute of CPU time for the loss to fall.
DEMO_TRAINING: dict[str, Any] = dict(num_class_images=16, num_epochs=6, train_batch_size=2, lr=1e-3,
                                     num_inference_steps=20, report_every_n_steps=8)


def run(cfg: RunConfig, training: dict[str, Any]) -> Path:
    """Run every step; `training` holds the TrainConfig settings the user gave. Returns the work folder."""
    if cfg.model_name and cfg.model_dir:
        raise RayboothError("give --model_name (to cache a model) or --model_dir (to use one), not both")
    if cfg.instance_images_dir and not cfg.class_noun:
        raise RayboothError('--class_noun is required with --instance_images_dir: the class of the subject, '
                            'such as "dog"')
    work_dir = Path(cfg.work_dir or ("raybooth-demo" if cfg.uses_tiny_model else "raybooth-run")).absolute()
    tuned_dir, samples_dir = work_dir / "model-tuned", work_dir / "images-new"
    check_output_dir(tuned_dir, cfg.overwrite)
    noun = cfg.class_noun or DEMO_CLASS_NOUN
    if cfg.uses_tiny_model:
        log(f"no model given: running the demo on the built-in tiny model in {work_dir}")

    # Samples of an earlier tuned model would pass for this one's: clear them first.
    for stale in image_files(samples_dir):
        stale.unlink()
    # The workers sample the tuned model while it is still in memory: no second load.
    train_cfg = TrainConfig(
        model_dir=pretrained_model(cfg, work_dir / "model-orig"), output_dir=tuned_dir,
        instance_images_dir=cfg.instance_images_dir or demo_subject(work_dir / "images-own"),
        instance_prompt=instance_prompt(cfg.unique_token, noun), class_images_dir=work_dir / "images-reg",
        class_prompt=class_prompt(noun), class_noun=noun, overwrite=cfg.overwrite,
        sample_prompts=cfg.sample_prompts or sample_prompts(cfg.unique_token, noun),
        num_samples_per_prompt=cfg.num_samples_per_prompt, samples_dir=samples_dir,
        **(DEMO_TRAINING if cfg.uses_tiny_model else {}) | training)
    train(train_cfg)
    samples = image_files(samples_dir)
    if train_cfg.use_lora:
        log(f"done. LoRA adapter: {tuned_dir}, for the base model {train_cfg.model_dir}; sample it with "
            f"`raybooth generate --model_dir {train_cfg.model_dir} --lora_weights_dir {tuned_dir} "
            f"--output_dir OUT --prompts PROMPT`")
    else:
        log(f"done. Fine-tuned pipeline: {tuned_dir}")
    log(f"{len(samples)} samples of {train_cfg.instance_prompt!r} and other scenes: {samples_dir}")
    return work_dir


def pretrained_model(cfg: RunConfig, cache_dir: Path) -> Path:
    if cfg.model_dir:
        return resolve_model_dir(cfg.model_dir)
    if cfg.model_name:
        return cache_model(cfg.model_name, cfg.revision, cache_dir)
    if (cache_dir / "model_index.json").exists():
        return resolve_model_dir(cache_dir)
    log(f"writing the tiny demo model to {cache_dir}")
    return write_tiny_model(cache_dir)


def demo_subject(folder: Path) -> Path:
    if not image_files(folder):
        write_demo_subject(folder)
    return folder
