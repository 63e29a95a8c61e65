"""`raybooth export --format single-file`: a diffusers pipeline folder as the one .safetensors
file in the original layout that ComfyUI, AUTOMATIC1111 and Forge load as a checkpoint: UNet,
VAE and text encoder(s), each renamed by its table (ldm.py) under its family's prefixes (sd.py,
sdxl.py). The weights are read from the folder's files as stored (no model is built), so the file
holds them bit for bit, or in fp16 with `half`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.errors import RayboothError
from raybooth.models.export import sd, sdxl
from raybooth.models.export.ldm import CONVERTERS, Layout
from raybooth.models.export.writing import check_output_file, is_lora, write_safetensors
from raybooth.models.folders import read_json, resolve_model_dir

if TYPE_CHECKING:
    import torch

_WEIGHT_FILES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' names
_INDEX = ".safetensors.index.json"  # of a sharded one


def layout_of(model_dir: Path) -> Layout:
    """The single-file layout of a checked pipeline folder's family, else a clear error."""
    pipeline = read_json(model_dir / "model_index.json", "model index").get("_class_name")
    if pipeline == sdxl.SDXL.pipeline_class:
        return sdxl.SDXL
    if pipeline in (sd.SD1.pipeline_class, None):
        return sd.layout(read_json(model_dir / "text_encoder" / "config.json", "text encoder config"))
    raise RayboothError(f"{model_dir} is a {pipeline}; raybooth exports Stable Diffusion 1.x, 2.x and XL pipelines")


def weight_files(folder: Path) -> list[Path]:
    """The files holding a component's weights: its safetensors file (or shards), else its .bin."""
    for stem in _WEIGHT_FILES:
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
        if (folder / f"{stem}{_INDEX}").is_file():
            shards = read_json(folder / f"{stem}{_INDEX}", "weights index")["weight_map"].values()
            return [folder / name for name in sorted(set(shards))]
    for stem in _WEIGHT_FILES:
        if (folder / f"{stem}.bin").is_file():
            return [folder / f"{stem}.bin"]
    raise RayboothError(f"{folder} has no weights file ({_WEIGHT_FILES[0]}.safetensors or the like)")


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    weights = {}
    for file in files:
        try:
            weights.update(load_file(file) if file.suffix == ".safetensors"
                           else torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # safetensors', pickle's and the filesystem's own errors
            raise RayboothError(f"{file} cannot be read ({type(error).__name__}: {error})") from None
    return weights


def original_weights(model_dir: Path, layout: Layout) -> dict[str, torch.Tensor]:
    """Every weight of the layout's components, under its name in the original layout."""
    weights = {}
    for component, prefix, kind in layout.parts:
        config = read_json(model_dir / component / "config.json", f"{component} config")
        converted = CONVERTERS[kind](read_weights(weight_files(model_dir / component)), config)
        weights.update({prefix + key: value for key, value in converted.items()})
    return weights


def export_single_file(model_dir: Path, output_file: Path, half: bool = False, overwrite: bool = False) -> Path:
    """Write `model_dir`'s pipeline as one original-layout file; returns its path."""
    if is_lora(Path(model_dir).expanduser()):
        raise RayboothError(f"{model_dir} is a LoRA adapter, not a pipeline: export it with --format kohya (or "
                            "fuse it into its base model with `raybooth merge-lora` and export that)")
    model_dir = resolve_model_dir(model_dir)
    layout = layout_of(model_dir)
    reads = tuple(file for component, _, _ in layout.parts for file in weight_files(model_dir / component))
    output = check_output_file(output_file, overwrite, reads)  # before any weight is read
    weights = original_weights(model_dir, layout)
    metadata = {"raybooth_family": layout.name, "raybooth_source": str(model_dir)}
    if (model_dir / "scheduler" / "scheduler_config.json").is_file():
        prediction = read_json(model_dir / "scheduler" / "scheduler_config.json", "scheduler config")
        metadata["prediction_type"] = str(prediction.get("prediction_type", "epsilon"))
    return write_safetensors(output, weights, half, metadata)
