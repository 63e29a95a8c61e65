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


def fingerprint(cfg, resolution: int) -> dict:
    """The settings a checkpoint only fits: resuming under others would train another model."""
    return {"model_dir": str(cfg.model_dir), "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt,
            "num_workers": cfg.num_workers, "train_batch_size": cfg.train_batch_size, "resolution": resolution,
            "seed": cfg.seed, "train_text_encoder": cfg.train_text_encoder,
            "use_lora": cfg.use_lora, "lora_rank": cfg.lora_rank if cfg.use_lora else None,
            "lora_alpha": cfg.adapter_alpha() if cfg.use_lora else None,
            "lora_text_encoder": cfg.lora_text_encoder if cfg.use_lora else None,
            # A step's meaning, the data stream, the optimizer's and schedule's state, the prompts' ids:
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "use_8bit_adam": cfg.use_8bit_adam,
            "use_ema": cfg.use_ema, "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
            "lr_num_cycles": cfg.lr_num_cycles, "lr_power": cfg.lr_power, "scale_lr": cfg.scale_lr,
            "train_text_encoder_steps": cfg.train_text_encoder_steps, "center_crop": cfg.center_crop,
            "random_flip": cfg.random_flip, "tokenizer_max_length": cfg.tokenizer_max_length}


def run_name(output_dir: Path) -> str:
    """Ray Train's name for the run that writes `output_dir`: the same command gets the same
    name, so a re-run finds the checkpoints of the one it continues."""
    return "raybooth-" + hashlib.sha1(str(Path(output_dir).absolute()).encode()).hexdigest()[:12]


def read_state(folder: Path) -> dict | None:
    """The checkpoint's step, history and settings; None for a folder that holds only final
    weights (the last report of a finished run)."""
    path = Path(folder) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def check_settings(folder: Path, settings: dict) -> None:
    saved = (read_state(folder) or {}).get("settings", settings)
    changed = sorted(name for name in settings if saved.get(name) != settings[name])
    if changed:
        raise RayboothError(f"the checkpoint in {folder} comes from a run with other settings ({', '.join(changed)}); "
                            "pass --resume_from_checkpoint none to start over")


def is_complete(folder: Path) -> bool:
    """Whether every file of the checkpoint is there (an upload cut short leaves some out)."""
    state = read_state(folder)
    if state is None:
        return False
    ranks = [f"rng-{rank}.pt" for rank in range(state["settings"]["num_workers"])]
    return all((Path(folder) / name).is_file() for name in (TRAINED, OPTIMIZER, *ranks))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders in a local run folder, oldest first."""
    return sorted(p.parent for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*/{STATE}") if is_complete(p.parent))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in a local run folder, if any."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
