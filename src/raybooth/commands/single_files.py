"""The commands' side of single-file checkpoints: `raybooth export` (models/export/), and a
single-file checkpoint given as --model_dir (or as `run`'s --model_name) read into a diffusers
folder before the command starts (models/from_single_file.py), so that every command goes on
as with a folder. Imported by cli.py; it imports torch and the model libraries only when used."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from raybooth.config.commands import ExportConfig

READS_A_MODEL = ("generate", "train", "run", "merge-lora", "evaluate")  # the commands whose --model_dir is read


def export_command(args: argparse.Namespace) -> None:
    from raybooth.models.export import export

    cfg = ExportConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ExportConfig)})
    print(export(cfg.model_dir, cfg.format, cfg.output_file, cfg.half, cfg.overwrite))


EXPORT = (export_command, ExportConfig,
          "Write a fine-tuned pipeline as one checkpoint file in the original layout, or a LoRA adapter in kohya's "
          "format: the files ComfyUI and AUTOMATIC1111 load.")


def with_model_folder(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with a single-file --model_dir (or `run --model_name FILE`) replaced by the diffusers
    folder it is read into, with the configs of --original_config_dir (or its default)."""
    if getattr(args, "command", None) not in READS_A_MODEL:
        return args
    from raybooth.models.from_single_file import single_file_to_folder

    configs = getattr(args, "original_config_dir", None)
    model_dir, name = getattr(args, "model_dir", None), getattr(args, "model_name", None)
    if model_dir is not None and Path(model_dir).expanduser().is_file():
        args.model_dir = single_file_to_folder(model_dir, configs)
    elif model_dir is None and name and Path(name).expanduser().is_file():
        args.model_dir, args.model_name = single_file_to_folder(Path(name), configs), None
    return args
