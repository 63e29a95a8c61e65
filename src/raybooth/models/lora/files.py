"""A saved LoRA adapter: checked against a base model cheaply (headers and configs only),
applied to a pipeline for generation, or merged into a full pipeline folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.errors import RayboothError
from raybooth.models.folders import model_family, read_json, resolve_model_dir
from raybooth.models.lora.adapters import add_text_encoder_adapter
from raybooth.models.output import LORA_WEIGHTS, check_output_dir, write_model_dir

if TYPE_CHECKING:  # imported where used: the header checks need no torch
    import torch


# One LoRA matrix in a diffusers file: "unet.<module>.lora.down.weight" as save_adapters writes
# it, or the peft ("lora_A") and text-encoder ("lora_linear_layer") spellings diffusers also reads.
_LORA_KEY = re.compile(r"^(?P<part>unet|text_encoder_2|text_encoder)\.(?P<module>.+)\."
                       r"(?P<matrix>lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)"
                       r"\.weight$")


_LOAD_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, OSError)


_ADAPTER = "raybooth"  # the name a loaded adapter has until it is fused and unloaded


def lora_weights_file(lora_dir: Path) -> Path:
    """The adapter file in `lora_dir` (or `lora_dir` itself, if that is the file)."""
    path = Path(lora_dir).expanduser().absolute()
    if not path.exists():
        raise RayboothError(f"LoRA folder {path} does not exist")
    if path.is_file():
        if path.name != LORA_WEIGHTS:
            raise RayboothError(f"{path} is not a LoRA folder or a {LORA_WEIGHTS} file")
        return path
    if not (path / LORA_WEIGHTS).is_file():
        raise RayboothError(f"LoRA folder {path} has no {LORA_WEIGHTS}")
    return path / LORA_WEIGHTS


def _lora_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise RayboothError(f"{weights} is not a readable safetensors file ({error})") from None
    strangers = [key for key in shapes if "lora" not in key]
    if not shapes or strangers:  # diffusers itself refuses a file with any non-LoRA tensor
        example = f" (it holds {strangers[0]!r})" if strangers else ""
        raise RayboothError(f"{weights} holds no LoRA weights{example}; is it a full model's weights?")
    return shapes


def _check_fit(weights: Path, shapes: dict[str, tuple[int, ...]], models: dict[str, torch.nn.Module],
               base: str) -> None:
    """Each LoRA matrix against its base layer: down takes the layer's inputs, up gives its
    outputs. Keys in other formats (kohya's) are left to diffusers."""
    layers = {part: dict(model.named_modules()) for part, model in models.items()}
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if not match or len(shape) < 2:
            continue
        part, name, down = match["part"], match["module"], match["matrix"].endswith(("down", "A"))
        if part not in layers:  # an SDXL adapter given an SD model: no second text encoder
            raise RayboothError(f"LoRA {weights} adapts a {part}, which {base} does not have; "
                                "was it trained for another model?")
        # Newer transformers flatten CLIPTextModel (no "text_model."); older LoRA files still carry it.
        candidates = (name, name.removeprefix("text_model."), f"text_model.{name}")
        layer = next((layers[part][c] for c in candidates if c in layers[part]), None)
        if layer is None:
            raise RayboothError(f"LoRA {weights} adapts {part}.{name}, which {base} does not have; "
                                "was it trained for another model?")
        side = "in" if down else "out"
        features = getattr(layer, f"{side}_features", None) or getattr(layer, f"{side}_channels", None)
        if features is not None and shape[1 if down else 0] != features:
            raise RayboothError(f"LoRA {weights} does not fit {base}: {part}.{name} has {features} {side}puts but "
                                f"the LoRA matrix {key} has shape {list(shape)}; was it trained for another model?")


def _meta_models(model_dir: Path, parts: set[str]) -> dict[str, torch.nn.Module]:
    """The base UNet / text encoders built from their configs on the meta device: their layer
    shapes without allocating or reading a single weight."""
    import torch
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    models = {}
    with torch.device("meta"):
        if "unet" in parts:
            models["unet"] = UNet2DConditionModel.from_config(
                read_json(model_dir / "unet" / "config.json", "UNet config"))
        for name, class_name in model_family(model_dir).text_encoders:
            if name in parts:
                models[name] = getattr(transformers, class_name)(CLIPTextConfig.from_dict(
                    read_json(model_dir / name / "config.json", "text encoder config")))
    return models


def check_lora_dir(lora_dir: Path, model_dir: Path) -> Path:
    """The checked adapter file, else a clear error: cheap (headers and configs only), so a bad
    --lora_weights_dir fails before any worker loads a model."""
    weights = lora_weights_file(lora_dir)
    shapes = _lora_shapes(weights)
    parts = {match["part"] for match in map(_LORA_KEY.match, shapes) if match}
    _check_fit(weights, shapes, _meta_models(Path(model_dir), parts), f"the base model {model_dir}")
    return weights


def _load_text_encoder_adapter(text_encoder: torch.nn.Module, state: dict, alphas: dict | None,
                               metadata: dict | None, prefix: str = "text_encoder.") -> None:
    """What diffusers' load_lora_into_text_encoder does, through peft directly (see
    `add_text_encoder_adapter`): the same key conversions and the same adapter config. `prefix`
    picks the encoder's part of the file (SDXL's second is "text_encoder_2.")."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, get_peft_kwargs
    from peft import LoraConfig

    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        return
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(text_encoder, "text_model"):  # see _check_fit
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if metadata:  # the saved config: rank and alpha as trained
        config = LoraConfig(**metadata)
    else:  # diffusers' guess: ranks from the matrices, alpha = rank unless the file has alphas
        ranks = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
        alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)}
        config = LoraConfig(**get_peft_kwargs(ranks, alphas or None, state, is_unet=False))
    add_text_encoder_adapter(text_encoder, config, _ADAPTER, state)


def load_adapters(pipeline, lora_dir: Path, scale: float) -> None:
    """Apply the adapter in `lora_dir` to a StableDiffusionPipeline at `scale` (0: the base
    model, 1: as trained). The adapter is fused into the weights and its layers removed: inference
    then costs what the base model's does (no extra LoRA matmuls per attention projection), and
    scale 0 adds an exact zero to every weight, so it gives the base model's image bit for bit."""
    from safetensors import SafetensorError

    weights = lora_weights_file(lora_dir)
    encoders = {name: getattr(pipeline, name) for name in ("text_encoder", "text_encoder_2")
                if getattr(pipeline, name, None) is not None}
    _check_fit(weights, _lora_shapes(weights), {"unet": pipeline.unet, **encoders}, "the loaded model")
    try:
        # pipeline.load_lora_weights, but with the text encoders' parts loaded by peft directly.
        state, alphas, metadata = pipeline.lora_state_dict(str(weights), return_lora_metadata=True)
        pipeline.load_lora_into_unet(state, alphas, pipeline.unet, adapter_name=_ADAPTER, metadata=metadata,
                                     _pipeline=pipeline)
        for name, encoder in encoders.items():
            _load_text_encoder_adapter(encoder, state, alphas, metadata, prefix=f"{name}.")
        pipeline.fuse_lora(components=["unet", *encoders], lora_scale=scale)
    except (*_LOAD_ERRORS, SafetensorError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RayboothError(f"could not load LoRA {weights}: {first_line}") from None
    pipeline.unload_lora_weights()  # drops the adapter layers; the fused weights stay


def merge_lora(model_dir: Path, lora_dir: Path, output_dir: Path, scale: float = 1.0,
               overwrite: bool = False) -> Path:
    """A full pipeline folder with the adapter fused into the base weights at `scale`, loadable
    by anything that reads diffusers pipelines. Written atomically, in fp32 as the base is loaded."""
    import torch

    model_dir = resolve_model_dir(model_dir)
    weights = check_lora_dir(lora_dir, model_dir)
    check_output_dir(output_dir, overwrite)  # before the slow load, not after
    family = model_family(model_dir)
    pipeline = family.pipeline_class().from_pretrained(model_dir, torch_dtype=torch.float32,
                                                       **family.generation_options(safety_checker=True))
    load_adapters(pipeline, weights, scale)
    return write_model_dir(output_dir, lambda folder: pipeline.save_pretrained(folder), overwrite)
