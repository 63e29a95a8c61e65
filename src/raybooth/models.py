"""Stable Diffusion pipeline folders: find and check one, load its parts for training, and
write a fine-tuned one without ever leaving a half-written folder behind."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from raybooth.config.watch import OUTPUT_EXTRAS
from raybooth.errors import RayboothError

if TYPE_CHECKING:  # imported where used: the driver checks model folders without it, so bad input fails at once
    import torch

# What training and generation need; a pipeline may carry more (safety checker, feature extractor).
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TRAINING_LOG = "training_log.json"  # written beside the fine-tuned pipeline
# What `train --use_lora` writes instead of a pipeline: the adapter, in the file name diffusers'
# load_lora_weights looks for, and the run's settings (which also mark the folder as ours).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_SETTINGS = "raybooth_lora.json"
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
    index = read_json(path / "model_index.json", "model index")
    for name in REQUIRED_COMPONENTS:
        spec = index.get(name)
        folder = path / name
        if not (isinstance(spec, list) and spec and spec[0]):
            raise RayboothError(f"model {path} has no {name} in its model_index.json")
        if not folder.is_dir():
            raise RayboothError(f"model {path} is missing its {name}/ folder")
        if name in ("unet", "vae", "text_encoder"):
            if not (folder / "config.json").is_file():
                raise RayboothError(f"model {path} is missing {name}/config.json")
            if not any(f.name.endswith(_WEIGHT_SUFFIXES) and f.is_file() for f in folder.iterdir()):
                raise RayboothError(f"model {path} has no weights in {name}/ (no .safetensors or .bin file)")
            for weights in folder.glob("*.safetensors"):
                check_weights(weights)
        elif not any(f.is_file() for f in folder.iterdir()):
            raise RayboothError(f"model {path} has an empty {name}/ folder")
    prediction_type = scheduler_config(path).get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise RayboothError(f"model {path} predicts {prediction_type!r}; raybooth trains {' or '.join(PREDICTION_TYPES)}")
    return path


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
    VAE and every UNet level halve the image evenly."""
    unet = read_json(model_dir / "unet" / "config.json", "UNet config")
    vae = read_json(model_dir / "vae" / "config.json", "VAE config")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    multiple = vae_scale * 2 ** (len(unet["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    resolution = requested or vae_scale * (sample_size if isinstance(sample_size, int) else sample_size[0])
    if resolution % multiple:
        raise RayboothError(f"--resolution must be a multiple of {multiple} for this model, got {resolution}")
    return resolution


def half_precision_dtype() -> torch.dtype:
    """bf16 on GPUs that compute in it (Ampere and later), else fp16: older GPUs only emulate bf16."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def use_flash_attention(device: torch.device | str) -> None:
    """PyTorch's flash attention in place of cuDNN's, its first choice on an H100: cuDNN's builds a
    plan per attention shape when it first runs it (1.4-5.3 s of the first batch of images, 2.3 s of
    a first training step at 1+1), for later calls 3-10% faster (bench/RESULTS.md). A large training
    step asks for cuDNN's again (stepping.training_attention): there it is much faster."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")


def load_for_training(model_dir: Path, device: torch.device, text_encoder_device: torch.device,
                      frozen_dtype: torch.dtype, train_text_encoder: bool, lora: bool = False):
    """The models one training worker needs. Trained modules keep fp32 weights (autocast gives
    the speed; fp32 masters keep small updates from rounding away); frozen ones take `frozen_dtype`.
    With `lora` UNet and text encoder are frozen too: only the adapters added later (lora.py) train."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from raybooth.training import DreamBoothModels

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.to(device, frozen_dtype if lora else torch.float32)
    unet.requires_grad_(not lora)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    text_encoder.to(text_encoder_device, torch.float32 if train_text_encoder and not lora else frozen_dtype)
    text_encoder.requires_grad_(train_text_encoder and not lora)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device, frozen_dtype)
    vae.requires_grad_(False)
    unet.train()
    text_encoder.train(train_text_encoder)
    vae.eval()
    return DreamBoothModels(
        unet=unet, text_encoder=text_encoder, vae=vae,
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
        train_text_encoder=train_text_encoder)


def save_trained_modules(models, folder: Path) -> None:
    """The modules training changed, in their diffusers/transformers folder layout."""
    from raybooth.parallel import unwrap

    unwrap(models.unet).save_pretrained(folder / "unet")
    if models.train_text_encoder:
        unwrap(models.text_encoder).save_pretrained(folder / "text_encoder")


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
        model_parts = {LORA_WEIGHTS, LORA_SETTINGS, TRAINING_LOG, *OUTPUT_EXTRAS}
    else:
        model_parts = {"model_index.json", TRAINING_LOG, *OUTPUT_EXTRAS, *read_json(path / "model_index.json",
                                                                                     "model index")}
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
    """Move the written `partial` folder into place, replacing a model already there."""
    path = Path(path).absolute()
    if path.exists():
        retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(retired)
        partial.rename(path)
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
