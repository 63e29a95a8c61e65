"""Writing a fine-tuned model without ever leaving a half-written folder behind: the output folder
checked (it must not lose anything), a hidden partial folder beside it, the base model's
untrained parts copied in, then swapped into place whole."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Callable

from raybooth.config.watch import OUTPUT_EXTRAS
from raybooth.errors import RayboothError
from raybooth.models.folders import read_json

TRAINING_LOG = "training_log.json"  # written beside the fine-tuned pipeline


# What `train --use_lora` writes instead of a pipeline: the adapter, in the file name diffusers'
# load_lora_weights looks for, and the run's settings (which also mark the folder as ours).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


LORA_SETTINGS = "raybooth_lora.json"


# What `train --output_kohya_format` adds to a LoRA output (diffusers' SDXL script's name), and what
# `train --save_single_file` adds to a pipeline output: one checkpoint file named after the folder.
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"


def single_file_name(output_dir: Path) -> str:
    return f"{Path(output_dir).name}.safetensors"


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an output folder that would lose something: one holding a model (unless
    `overwrite`), and one holding anything else, which --overwrite would delete with it."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RayboothError(f"output {path} is a file, not a folder")
    if not any(path.iterdir()):
        return
    lora = (path / LORA_WEIGHTS).is_file() and (path / LORA_SETTINGS).is_file()  # a `train --use_lora` output
    if not lora and not (path / "model_index.json").exists():
        raise RayboothError(f"{path} is not empty and holds no model; choose a new or empty folder")
    if not overwrite:
        what = "a LoRA adapter" if lora else "a model"
        raise RayboothError(f"{path} already holds {what}; pass --overwrite to replace it")
    if lora:
        model_parts = {LORA_WEIGHTS, LORA_SETTINGS, KOHYA_WEIGHTS, TRAINING_LOG, *OUTPUT_EXTRAS}
    else:
        model_parts = {"model_index.json", TRAINING_LOG, single_file_name(path), *OUTPUT_EXTRAS,
                       *read_json(path / "model_index.json", "model index")}
    strangers = sorted(entry.name for entry in path.iterdir() if entry.name not in model_parts)
    if strangers:
        raise RayboothError(f"{path} holds a model and other files ({', '.join(strangers[:5])}), which "
                            "--overwrite would delete; move them out first")


def start_model_dir(path: Path, overwrite: bool) -> Path:
    """A fresh hidden folder beside `path` to write a model into; `finish_model_dir` swaps it in."""
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    return partial


def finish_model_dir(partial: Path, path: Path) -> Path:
    """Move the written `partial` folder into place, replacing a model already there. Plain renames
    on purpose: `partial` and the retired model are made beside `path`, on its filesystem, so
    each step is whole (files/writes.move is for folders that may come from another one)."""
    path = Path(path).absolute()
    if path.exists():
        retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(retired)
        try:
            partial.rename(path)
        except BaseException:
            retired.rename(path)  # the model it was to replace, back in place
            raise
        shutil.rmtree(retired)
    else:
        partial.rename(path)
    return path


def write_model_dir(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run `write(folder)` on a fresh folder beside `path`, then swap it into place: a failure
    at any point leaves `path` as it was."""
    partial = start_model_dir(path, overwrite)
    try:
        write(partial)
        return finish_model_dir(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def copy_base_components(base_dir: Path, folder: Path, skip: tuple[str, ...]) -> None:
    """The base pipeline's index and components into `folder`, except those in `skip` (the ones
    training replaces)."""
    index = read_json(base_dir / "model_index.json", "model index")
    shutil.copy2(base_dir / "model_index.json", folder / "model_index.json")
    for name, spec in index.items():
        if isinstance(spec, list) and spec and spec[0] and name not in skip and (base_dir / name).is_dir():
            # copytree follows the Hugging Face cache's symlinks, so the output owns its files.
            shutil.copytree(base_dir / name, folder / name)


def copy_trained(trained_dir: Path, folder: Path) -> None:
    """What a training checkpoint holds (unet/, text_encoder/, the training log) into `folder`."""
    for entry in trained_dir.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, folder / entry.name)
        else:
            shutil.copy2(entry, folder / entry.name)
