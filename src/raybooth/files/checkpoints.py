"""Checkpoint folders as the driver sees them, before any tensor is touched: their names and
files, the settings a checkpoint fits, and the newest complete one in a run folder. What is in
them, and how it is written and restored, is train/checkpoints.py's (it needs torch, which the driver
imports only once its input is checked)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raybooth.errors import RayboothError

STATE = "trainer_state.json"


TRAINED = "trained.safetensors"


OPTIMIZER = "optimizer.pt"


CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


# Each of `raybooth train`'s settings either belongs to a checkpoint's fingerprint, and a resume
# under another value is refused (it would train another model, or the restored optimizer would
# silently keep the old value), or takes effect when the run resumes, and is logged as changed.
# tests/test_resume_settings.py fails on a setting in neither list.
FINGERPRINT_FIELDS = (
    "model_dir", "pretrained_vae_model_name_or_path", "instance_images_dir", "instance_prompt", "class_images_dir", "class_prompt", "num_class_images",
    "num_workers", "train_batch_size", "seed", "train_text_encoder",  # the data stream and what trains
    "use_lora", "lora_rank", "lora_alpha", "lora_text_encoder", "use_dora", "lora_dropout",
    # A step's meaning, the optimizer's and schedule's state (restored with the old values), the prompts' ids:
    "lr", "text_encoder_lr", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "optimizer", "adam_weight_decay_text_encoder", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
    "gradient_accumulation_steps", "use_8bit_adam", "use_ema", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
    "lr_power", "scale_lr", "train_text_encoder_steps", "center_crop", "random_flip", "tokenizer_max_length",
    "resolution",
    # The photos' share of an epoch, their pixels and their prompts: the data stream itself.
    "repeats", "image_interpolation_mode", "caption_column")
TAKES_EFFECT_ON_RESUME = (
    # How long, and the loss's terms: read afresh each step.
    "num_epochs", "max_train_steps", "prior_loss_weight", "max_grad_norm", "offset_noise", "snr_gamma", "class_noun",
    # How the same steps are computed: precision, devices and the speed levers.
    "mixed_precision", "use_gpu", "gpus_per_worker", "placement_strategy", "ddp_bucket_mb", "bf16_gradients",
    "channels_last", "cudnn_attention", "cuda_graphs", "compile", "gradient_checkpointing",
    "pre_compute_text_embeddings",
    # Where things go and what is watched: the cluster, checkpoints, reports, samples, logs.
    "output_dir", "address", "storage_path", "checkpointing_steps", "checkpoints_total_limit", "max_failures",
    "local_mode", "overwrite", "report_every_n_steps", "verbose", "report_to", "logging_dir", "validation_prompt",
    "validation_steps", "num_validation_images", "validation_inference_steps", "sample_batch_size", "sampler",
    "num_inference_steps", "guidance_scale", "sample_prompts", "num_samples_per_prompt", "samples_dir",
    "original_config_dir", "save_single_file", "output_kohya_format",
    "resume_from_checkpoint")  # how to resume: never logged as a change


def fingerprint(cfg, resolution: int) -> dict:
    """The settings a checkpoint only fits, as the run resolved them (the learning rate's and
    LoRA alpha's defaults, the resolution, absolute folders)."""
    resolved = {"model_dir": str(cfg.model_dir), "lr": cfg.learning_rate(), "resolution": resolution,
                "lora_alpha": cfg.adapter_alpha() if cfg.use_lora else None,
                "lora_rank": cfg.lora_rank if cfg.use_lora else None,
                "lora_text_encoder": cfg.lora_text_encoder if cfg.use_lora else None,
                **{name: str(Path(getattr(cfg, name)).expanduser().absolute())
                   for name in ("instance_images_dir", "class_images_dir")}}
    return {name: resolved[name] if name in resolved else getattr(cfg, name) for name in FINGERPRINT_FIELDS}


def resumable_flags(cfg) -> dict:
    """The settings that take effect on resume, as this run has them (JSON-ready), so that a
    resumed run can say which of them changed."""
    return {name: json.loads(json.dumps(getattr(cfg, name), default=str)) for name in TAKES_EFFECT_ON_RESUME
            if name != "resume_from_checkpoint"}


def changed_flags(folder: Path, flags: dict) -> list[str]:
    """`--name old -> new` for each resumable setting the checkpoint's run had otherwise."""
    saved = (read_state(folder) or {}).get("flags") or {}
    return [f"--{name} {saved[name]} -> {value}" for name, value in flags.items()
            if name in saved and saved[name] != value]


def run_name(output_dir: Path) -> str:
    """Ray Train's name for the run that writes `output_dir`: the same command gets the same
    name, so a re-run finds the checkpoints of the one it continues."""
    return "raybooth-" + hashlib.sha1(str(Path(output_dir).absolute()).encode()).hexdigest()[:12]


def read_state(folder: Path) -> dict | None:
    """The checkpoint's step, history and settings; None for a folder that holds only final
    weights (the last report of a finished run)."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RayboothError(f"checkpoint state {path} is not valid JSON ({error}): the checkpoint is damaged; "
                            "pass another one, or --resume_from_checkpoint none to start over") from None


def check_settings(folder: Path, settings: dict) -> None:
    """Refuse a checkpoint whose run had other fingerprint settings, naming the flags. One written
    by an earlier raybooth records fewer; those it records must match."""
    saved = (read_state(folder) or {}).get("settings", settings)
    changed = sorted(name for name in settings if name in saved and saved[name] != settings[name])
    if changed:
        flags = ", ".join(f"--{name} {saved[name]} -> {settings[name]}" for name in changed)
        raise RayboothError(f"the checkpoint in {folder} comes from a run with other settings ({flags}), which a "
                            "resumed run cannot change; use the checkpoint's, or pass --resume_from_checkpoint none "
                            "to start over")


def is_complete(folder: Path) -> bool:
    """Whether every file of the checkpoint is there. Each file is written whole under a temporary
    name and renamed (train/checkpoints.py), the state last by rank 0: a write cut short at any
    moment leaves files out, never half a file."""
    try:
        state = read_state(folder)
    except RayboothError:
        return False
    if state is None:
        return False
    ranks = [f"rng-{rank}.pt" for rank in range(state["settings"]["num_workers"])]
    return all((Path(folder) / name).is_file() for name in (TRAINED, OPTIMIZER, *ranks))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders in a local run folder, oldest first."""
    return sorted(p.parent for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*/{STATE}") if is_complete(p.parent))


def torn_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders in a local run folder that some write left incomplete, newer than its
    newest complete one (an older torn one was superseded, and says nothing now)."""
    latest = latest_checkpoint(run_dir)
    return sorted(p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and not is_complete(p) and (latest is None or p.name > latest.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in a local run folder, if any."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
