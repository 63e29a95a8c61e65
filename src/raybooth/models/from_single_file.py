"""A single-file checkpoint as --model_dir: the one .safetensors (or .ckpt) file ComfyUI and
AUTOMATIC1111 load, such as a community checkpoint, read once with diffusers' `from_single_file`
into a diffusers pipeline folder beside it (`NAME-diffusers/`), which every command then reads
as it reads any pipeline folder; later runs reuse it while the file and the configs are the same.

The file holds weights only. The component configs (layer sizes, tokenizers, the scheduler and
its prediction type) come from a local diffusers pipeline folder of the same family, never from
the hub: --original_config_dir, by default the pipeline folder the file lies in (as in the hub's
repositories that ship both, and `train --save_single_file`'s output). The family is told from the
file's keys, by the prefixes the original layouts give the text encoders (export/sd.py, sdxl.py).
This module imports no other of models/, so that models/folders.py may route a file through it."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.models.export import sd, sdxl
from raybooth.models.export.ldm import Layout
from raybooth.terminal.log import log

FOLDER_SUFFIX = "-diffusers"  # model.safetensors is read into model-diffusers/ beside it
STAMP = "raybooth_single_file.json"  # in that folder: which file, as of when, with which configs
SUFFIXES = (".safetensors", ".ckpt")
REFERENCE = {sd.SD1: "stable-diffusion-v1-5/stable-diffusion-v1-5", sd.SD2: "stabilityai/stable-diffusion-2-1",
             sdxl.SDXL: "stabilityai/stable-diffusion-xl-base-1.0"}  # a pipeline of each family, to name


def checkpoint_keys(path: Path) -> tuple[list[str], str | None]:
    """The file's weight names, and the dtype of its UNet ("float16", ...), from its header where
    it is a safetensors file; a .ckpt is unpickled (weights only) to see them."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                keys = list(file.keys())
                unet = next((key for key in keys if key.startswith(sd.UNET)), None)
                dtype = file.get_slice(unet).get_dtype() if unet else None
            return keys, {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(dtype)
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError("it holds no dictionary of weights")
        unet = next((value for key, value in state.items() if key.startswith(sd.UNET)), None)
        return list(state), str(unet.dtype).removeprefix("torch.") if unet is not None else None
    except Exception as error:  # safetensors', pickle's and the filesystem's own errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RayboothError(f"{path} is not a checkpoint raybooth can read ({reason})") from None


def layout_of_keys(path: Path, keys: list[str]) -> Layout:
    """The family of a single file, from where its text encoders are; else one line saying why not."""
    if any("lora" in key for key in keys):  # kohya's, diffusers' and peft's LoRA names all say so
        raise RayboothError(f"{path} is a LoRA, not a checkpoint: it goes with --lora_weights_dir (in diffusers' "
                            "format) or into ComfyUI or AUTOMATIC1111 on top of its base model")
    if not any(key.startswith(sd.UNET) for key in keys):
        raise RayboothError(f"{path} holds no Stable Diffusion UNet (no {sd.UNET}* weights); is it a VAE, a LoRA or "
                            "an embedding rather than a whole checkpoint?")
    for layout in (sdxl.SDXL, sd.SD2, sd.SD1):
        if all(any(key.startswith(prefix) for key in keys) for _, prefix, _ in layout.parts):
            return layout
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        raise RayboothError(f"{path} is a Stable Diffusion XL refiner; raybooth trains SDXL's base model")
    raise RayboothError(f"cannot tell which model family {path} is: it has a UNet but no VAE and text encoder(s) "
                        "where Stable Diffusion 1.x, 2.x or XL checkpoints keep them")


def _pipeline_folder(path: Path) -> Path | None:
    """`path` if it is a diffusers pipeline folder, or the one snapshot of a Hugging Face cache folder."""
    if (path / "model_index.json").is_file():
        return path
    snapshots = sorted(p.parent for p in path.glob("models--*/snapshots/*/model_index.json"))
    return snapshots[0] if len(snapshots) == 1 else None


def config_folder(path: Path, layout: Layout, given: Path | None) -> Path:
    """The checked pipeline folder whose configs read `path`: `given`, else the file's own folder."""
    folder = _pipeline_folder(Path(given).expanduser().absolute()) if given else _pipeline_folder(path.parent)
    if folder is None:
        where = (f"--original_config_dir {Path(given).expanduser().absolute()} is not a diffusers pipeline folder "
                 "(it has no model_index.json)" if given else
                 f"its folder {path.parent} is no diffusers pipeline folder to take them from (the default)")
        raise RayboothError(f"{path} is a single-file {layout.name} checkpoint, read with the component configs of "
                            f"a diffusers pipeline of its family, and {where}: pass --original_config_dir with one, "
                            f"such as a `raybooth cache-model` snapshot of {REFERENCE[layout]}")
    try:
        pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        text_encoder = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RayboothError(f"{folder} cannot lend its configs to {path.name}: {error}") from None
    if pipeline == sdxl.SDXL.pipeline_class:
        found = sdxl.SDXL
    else:
        found = sd.layout(text_encoder) if pipeline in (sd.SD1.pipeline_class, None) else None
    if found is not layout:
        raise RayboothError(f"{path} is a {layout.name} checkpoint, but {folder} is a "
                            f"{found.name if found else pipeline} pipeline: pass --original_config_dir with a "
                            f"pipeline of its family, such as {REFERENCE[layout]}")
    return folder


def folder_for(path: Path, cache_dir: Path | None) -> Path:
    """Where `path` is read into: beside it, or in `cache_dir`, or, where its folder cannot be
    written, in raybooth's cache (~/.cache/raybooth/single-file, or $XDG_CACHE_HOME's)."""
    if cache_dir is None and os.access(path.parent, os.W_OK):
        return path.parent / f"{path.stem}{FOLDER_SUFFIX}"
    import hashlib

    root = Path(cache_dir).expanduser() if cache_dir else (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raybooth" / "single-file")
    return root.absolute() / f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}{FOLDER_SUFFIX}"


def _stamp(path: Path, config_dir: Path) -> dict:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "original_config_dir": str(config_dir)}


def _stamp_of(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def single_file_to_folder(path: Path, config_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The diffusers pipeline folder that holds the single-file checkpoint `path`, converted now
    (written whole, then renamed into place) or earlier (reused while the file, its size and time
    and the config folder are the same)."""
    path = Path(path).expanduser().absolute()
    if path.suffix not in SUFFIXES:
        raise RayboothError(f"{path} is a file, not a pipeline folder, and not a single-file checkpoint "
                            f"({' or '.join(SUFFIXES)}) either")
    keys, dtype = checkpoint_keys(path)
    layout = layout_of_keys(path, keys)
    configs = config_folder(path, layout, config_dir)
    target, stamp = folder_for(path, cache_dir), _stamp(path, configs)
    if target.exists():
        found = _stamp_of(target)
        if found == stamp:
            return target
        if found is None or found.get("source") != str(path):
            raise RayboothError(f"{target} is in the way: it is not raybooth's reading of {path}; move it away")
    log(f"reading the single-file {layout.name} checkpoint {path} into the diffusers folder {target}, with the "
        f"configs of {configs} (once: later runs reuse it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _convert(path, layout, configs, dtype, partial)
        (partial / STAMP).write_text(json.dumps(stamp, indent=1))
        _place(partial, target, stamp)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _convert(path: Path, layout: Layout, configs: Path, dtype: str | None, folder: Path) -> None:
    import diffusers
    import torch

    from raybooth.terminal.log import quiet_model_libraries

    quiet_model_libraries()
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if layout is not sdxl.SDXL else {}
    try:
        pipeline = getattr(diffusers, layout.pipeline_class).from_single_file(
            str(path), config=str(configs), local_files_only=True,
            torch_dtype=getattr(torch, dtype) if dtype else None, **extra)
    except Exception as error:  # diffusers raises its own, torch's and the filesystem's errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RayboothError(f"cannot read {path} as a {layout.name} checkpoint with the configs of {configs}: "
                            f"{reason}") from None
    for component, _, _ in layout.parts:
        if any(p.device.type == "meta" for p in getattr(pipeline, component).parameters()):
            raise RayboothError(f"{path} lacks some of the {component}'s weights that {configs}'s config asks for; "
                                "is the config folder of another size of model?")
    pipeline.save_pretrained(folder)


def _place(partial: Path, target: Path, stamp: dict) -> None:
    """`partial` renamed to `target`, replacing an outdated reading there; a reading another
    process placed meanwhile, of the same file, is kept and ours dropped."""
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(retired)
    try:
        partial.rename(target)
    except OSError:
        if _stamp_of(target) != stamp:
            if retired is not None and not target.exists():
                retired.rename(target)
            raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
