"""Stable Diffusion pipeline folders: find one (a folder, or the snapshot in a Hugging Face cache
folder), check that it holds every component training and generation load, and read the
resolution it works at; all from configs and headers, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.models.families import FAMILIES, ModelFamily, family_named

PREDICTION_TYPES = ("epsilon", "v_prediction")


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def resolve_model_dir(path: Path) -> Path:
    """A checked pipeline folder: `path` itself, or the one snapshot inside a Hugging Face cache
    folder such as `raybooth cache-model` fills (DIR/models--ORG--NAME/snapshots/HASH)."""
    path = Path(path).expanduser().absolute()  # Ray Train workers run in a folder of their own
    if not path.exists():
        raise RayboothError(f"model folder {path} does not exist")
    if (path / "model_index.json").is_file():
        return check_model_dir(path)
    snapshots = sorted(p.parent for p in path.glob("models--*/snapshots/*/model_index.json"))
    if len(snapshots) == 1:
        return check_model_dir(snapshots[0])
    if snapshots:
        listed = ", ".join(str(s) for s in snapshots[:3])
        raise RayboothError(f"{path} caches several models; pass one snapshot folder: {listed}")
    raise RayboothError(f"{path} is not a diffusers pipeline folder (it has no model_index.json)")


def check_model_dir(path: Path) -> Path:
    """`path` if it holds every component that training and generation load, else a clear error."""
    try:
        return _check_model_dir(path)
    except PermissionError as error:
        raise RayboothError(f"model {path}: {error.filename or path} cannot be read (permission denied); give this "
                            "user read access to the model folder") from None


def _check_model_dir(path: Path) -> Path:
    index = read_json(path / "model_index.json", "model index")
    family = family_of_index(path, index)
    for name in family.components:
        spec = index.get(name)
        folder = path / name
        if not (isinstance(spec, list) and spec and spec[0]):
            raise RayboothError(f"model {path} has no {name} in its model_index.json")
        if not folder.is_dir():
            raise RayboothError(f"model {path} is missing its {name}/ folder")
        if name in family.weighted:
            if not (folder / "config.json").is_file():
                raise RayboothError(f"model {path} is missing {name}/config.json")
            check_weights_in(folder, f"model {path} has no weights in {name}/")
        elif not any(f.is_file() for f in folder.iterdir()):
            raise RayboothError(f"model {path} has an empty {name}/ folder")
    prediction_type = scheduler_config(path).get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise RayboothError(f"model {path} predicts {prediction_type!r}; raybooth trains {' or '.join(PREDICTION_TYPES)}")
    return path


def check_vae_dir(path: Path) -> Path:
    """A VAE folder of its own (--pretrained_vae_model_name_or_path), absolute, checked as a
    pipeline's components are: an AutoencoderKL config and readable weights."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise RayboothError(f"VAE folder {path} does not exist")
    config = read_json(path / "config.json", "VAE config")
    if config.get("_class_name") != "AutoencoderKL":
        raise RayboothError(f"{path} holds a {config.get('_class_name')}, not a VAE (AutoencoderKL)")
    check_weights_in(path, f"VAE folder {path} has no weights")
    return path


def check_weights_in(folder: Path, none_found: str) -> None:
    """A component folder's weight files, each safetensors file's header readable; `none_found`
    (the message's start) where it has none."""
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) and f.is_file() for f in folder.iterdir()):
        raise RayboothError(f"{none_found} (no .safetensors or .bin file)")
    for weights in folder.glob("*.safetensors"):
        check_weights(weights)


def model_family(model_dir: Path) -> ModelFamily:
    """The family of the pipeline folder `model_dir` (models/families/)."""
    return family_of_index(model_dir, read_json(Path(model_dir) / "model_index.json", "model index"))


def family_of_index(path: Path, index: dict) -> ModelFamily:
    family = family_named(index.get("_class_name"))
    if family is None:
        trained = "; ".join(f"{each.name} ({', '.join(each.pipeline_classes)})" for each in FAMILIES)
        raise RayboothError(f"model {path} is a {index.get('_class_name')} pipeline; raybooth trains {trained}")
    return family


def check_weights(path: Path) -> None:
    """A truncated or corrupt safetensors file, found from its header (a cheap read), rather than
    by a worker's traceback minutes later."""
    from safetensors import SafetensorError, safe_open

    try:  # numpy's framework: reading the header needs no torch, which the driver imports later
        with safe_open(path, framework="numpy") as weights:
            weights.keys()
    except (SafetensorError, OSError) as error:
        raise RayboothError(f"{path} is not a readable safetensors file ({error})") from None


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RayboothError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RayboothError(f"{what} {path} is not valid JSON ({error})") from None


def scheduler_config(model_dir: Path) -> dict:
    return read_json(model_dir / "scheduler" / "scheduler_config.json", "scheduler config")


def resolve_resolution(model_dir: Path, requested: int | None) -> int:
    """The image side to work at: the model's native one unless `requested`, which must let the
    VAE and every UNet level halve the image evenly, and stay near the size the model was trained
    at (from a quarter to twice its side): far below it the UNet's deepest level has next to no
    latent pixels and the model makes no images worth learning from; far above it the attention's
    memory grows as the square of the pixel count (at 100000 px, hundreds of GB for one image)."""
    unet = read_json(model_dir / "unet" / "config.json", "UNet config")
    vae = read_json(model_dir / "vae" / "config.json", "VAE config")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    multiple = vae_scale * 2 ** (len(unet["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    native = vae_scale * (sample_size if isinstance(sample_size, int) else sample_size[0])
    resolution = requested or native
    if resolution % multiple:
        raise RayboothError(f"--resolution must be a multiple of {multiple} for this model, got {resolution}")
    lowest, highest = max(multiple, native // 4), 2 * native
    if not lowest <= resolution <= highest:
        raise RayboothError(f"--resolution {resolution} is outside what this model can take: it was trained at "
                            f"{native} px, and raybooth works from {lowest} to {highest} px (far below, its UNet's "
                            "deepest level has next to no latent pixels; far above, memory grows as the square of "
                            "the pixel count)")
    return resolution
