"""The pieces every command's settings are made of: `option`, a dataclass field that carries
its command-line help, and the checks the settings share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from raybooth.errors import RayboothError

PRECISIONS = ("auto", "no", "fp16", "bf16")
FULL_DEFAULT_LR, LORA_DEFAULT_LR = 5e-6, 1e-4
LORA_DEFAULT_RANK = 4  # diffusers' train_dreambooth_lora.py default
DTYPES = ("auto", "fp32", "fp16", "bf16")
DDP_BUCKET_MB = 100  # DDP's default is 25; 100 was faster at SD-1.5 size (bench/RESULTS.md, issue 10)
# Samplers for class images and samples, with the steps each takes by default. DPM-Solver++ (2M)
# at 20 steps was as good as the 50-step samplers by every classifier measure of the small world,
# and 2.4x as fast on an H100 (bench/RESULTS.md, issue 5).
SAMPLER_STEPS = {"dpm++": 20, "model": 50}
SAMPLERS = tuple(SAMPLER_STEPS)
SAMPLER_HELP = ("Denoising sampler: dpm++ (DPM-Solver++ 2M on the model's noise schedule) or model (the scheduler "
                "the model folder names: PNDM for SD-1.5).")
STEPS_HELP = "Denoising steps per image (default: 20 with --sampler dpm++, 50 with --sampler model)."
ORIGINAL_CONFIG_HELP = ("With a single-file checkpoint as --model_dir (the .safetensors or .ckpt that ComfyUI and "
                        "AUTOMATIC1111 load): a diffusers pipeline folder of its family, whose configs (layer sizes, "
                        "tokenizers, scheduler) read it once into NAME-diffusers/ beside it (default: the pipeline "
                        "folder the file lies in).")


def inference_steps(sampler: str, steps: int | None) -> int:
    """The steps asked for, or the sampler's default."""
    return steps if steps is not None else SAMPLER_STEPS[sampler]


def option(default: Any = dataclasses.MISSING, help: str = "", **cli: Any) -> Any:
    """A dataclass field that carries its command-line help (and argparse extras) along."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def given(**values: Any) -> dict[str, Any]:
    """The values that are set (optional flags left at None drop out)."""
    return {name: value for name, value in values.items() if value is not None}


def finite(**values: float) -> None:
    """inf and nan parse as floats, and would train a model of NaN weights to the end."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise RayboothError(f"--{name} must be a finite number, got {value}")


def check_prompts_given(flag: str, prompts: list[str]) -> None:
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            raise RayboothError(f"{flag}: prompt {number} of {len(prompts)} is empty")


def positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise RayboothError(f"--{name} must be at least 1, got {value}")
