"""LoRA DreamBooth (`--use_lora`): train adapters (adapters.py), then check, apply or merge a
saved one (files.py)."""

from __future__ import annotations

from raybooth.models.lora.adapters import (TEXT_ENCODER_TARGETS, UNET_TARGETS, adapter_parameters, add_adapters,
                                           add_to_models, fuse_adapters, save_adapters, save_output)
from raybooth.models.lora.files import check_lora_dir, load_adapters, lora_weights_file, merge_lora
from raybooth.models.output import LORA_SETTINGS, LORA_WEIGHTS


__all__ = ["LORA_SETTINGS", "LORA_WEIGHTS", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "adapter_parameters",
           "add_adapters", "add_to_models", "check_lora_dir", "fuse_adapters", "load_adapters",
           "lora_weights_file", "merge_lora", "save_adapters", "save_output"]
