"""What both exports share: the output file checked before any weight is read, the weights
written whole or not at all (a hidden partial file renamed into place), and the two kinds of
raybooth output told apart."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.errors import RayboothError
from raybooth.files.writes import write_whole
from raybooth.models.output import LORA_WEIGHTS

if TYPE_CHECKING:
    import torch


def is_lora(folder: Path) -> bool:
    """A LoRA adapter (`train --use_lora`'s output, or a diffusers LoRA folder or file), not a pipeline."""
    folder = Path(folder)
    return folder.name == LORA_WEIGHTS if folder.is_file() else (folder / LORA_WEIGHTS).is_file()


def check_output_file(path: Path, overwrite: bool, reads: tuple[Path, ...] = ()) -> Path:
    """The absolute output file, refused in one line where writing it would lose something: an
    existing file without `overwrite`, a folder, or one of the files the export reads."""
    path = Path(path).expanduser().absolute()
    if path.suffix != ".safetensors":
        raise RayboothError(f"--output_file {path} must end in .safetensors: raybooth writes safetensors files")
    if path.is_dir():
        raise RayboothError(f"--output_file {path} is a folder; name the file to write")
    if any(path == Path(read).absolute() for read in reads):
        raise RayboothError(f"--output_file {path} is one of the files the export reads; choose another")
    if path.exists() and not overwrite:
        raise RayboothError(f"{path} already exists; pass --overwrite to replace it")
    return path


def write_safetensors(path: Path, weights: dict[str, torch.Tensor], half: bool, metadata: dict[str, str]) -> Path:
    """`weights` into `path` (fp16 floating-point weights with `half`), whole or not at all."""
    import torch
    from safetensors.torch import save_file

    if half:
        weights = {key: value.to(torch.float16) if value.is_floating_point() else value
                   for key, value in weights.items()}
    weights = {key: value.contiguous() for key, value in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda partial: save_file(weights, partial, metadata={"format": "pt", **metadata}))
    return path
