"""`raybooth export --format kohya`: a LoRA adapter in kohya's key format, the one ComfyUI,
AUTOMATIC1111 and Forge load as a LoRA: `lora_unet_<module>` and `lora_te_<module>` (SDXL:
`lora_te1_`, `lora_te2_`), each with its `lora_down`, `lora_up` and `alpha`. The names come from
diffusers' own converters, convert_all_state_dict_to_peft then convert_state_dict_to_kohya, as
diffusers' train_dreambooth_lora_sdxl.py --output_kohya_format uses them, with three corrections:
each module's alpha is the one it trained with (convert_state_dict_to_kohya writes alpha = rank,
which would load an adapter trained at another alpha at the wrong strength); text-encoder modules
are named under `text_model.` as kohya names them (newer transformers save CLIPTextModel without
it); and a pipeline of one text encoder gets kohya's `lora_te_`, not SDXL's `lora_te1_`. DoRA
adapters are refused: the converter mangles their magnitudes' names, and the tools read kohya's
`dora_scale` in shapes of their own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.errors import RayboothError
from raybooth.models.export.writing import check_output_file, is_lora, write_safetensors
from raybooth.models.lora.files import lora_weights_file
from raybooth.models.output import LORA_SETTINGS

if TYPE_CHECKING:
    import torch

PARTS = ("unet", "text_encoder", "text_encoder_2")
_XL = "StableDiffusionXLPipeline"


def _read(weights: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The adapter's tensors, the adapter config diffusers saved in its header (rank, alpha and
    their patterns per part), and raybooth's settings beside it (empty where there are none)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(weights, framework="pt") as file:
            metadata = file.metadata() or {}
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise RayboothError(f"{weights} is not a readable safetensors file ({error})") from None
    settings_file = weights.parent / LORA_SETTINGS
    try:
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        return state, json.loads(metadata.get("lora_adapter_metadata") or "{}"), settings
    except ValueError as error:
        raise RayboothError(f"the adapter's settings in {weights.parent} are not valid JSON ({error})") from None


def _is_xl(state: dict, settings: dict) -> bool:
    """An SDXL adapter: it adapts a second text encoder, or its base model is an SDXL pipeline."""
    index = Path(settings.get("base_model") or "/nonexistent") / "model_index.json"
    base = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return base == _XL or any(key.startswith("text_encoder_2.") for key in state)


def _alpha(module: str, part: str, config: dict, settings: dict, rank: int) -> float:
    """The alpha `module` trained with: the part's alpha pattern that matches it (as peft matches
    module names), else the part's alpha; else raybooth's settings'; else the rank, which is what
    diffusers assumes for an adapter saved without either."""
    for pattern, alpha in (config.get(f"{part}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get(f"{part}.lora_alpha") or settings.get("alpha") or rank)


def kohya_state(weights: Path) -> dict[str, torch.Tensor]:
    """The adapter file `weights` in kohya's names, every matrix of it placed (else an error)."""
    import torch
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    state, config, settings = _read(weights)
    strangers = [key for key in state if not key.startswith(tuple(f"{part}." for part in PARTS))]
    if strangers:
        raise RayboothError(f"{weights} holds {strangers[0]!r}, which is no UNet or text-encoder LoRA weight")
    if any("lora_magnitude_vector" in key for key in state):
        raise RayboothError(f"{weights} is a DoRA adapter (--use_dora), whose magnitudes kohya's format keeps in no "
                            "one agreed shape: fuse it into its base with `raybooth merge-lora` and export that with "
                            "--format single-file")
    xl, kohya = _is_xl(state, settings), {}
    for part in PARTS:
        own = {key: value for key, value in state.items() if key.startswith(f"{part}.")}
        if not own:
            continue
        if part != "unet":  # kohya names text-encoder modules under text_model.
            own = {f"{part}.text_model.{key[len(part) + 1:]}" if not key.startswith(f"{part}.text_model.") else key:
                   value for key, value in own.items()}
        try:
            peft = convert_all_state_dict_to_peft(own)
            converted = convert_state_dict_to_kohya(peft)
        except (ValueError, KeyError) as error:
            raise RayboothError(f"{weights}: the {part}'s adapter is in no LoRA format diffusers converts "
                                f"({error})") from None
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_",
                  "text_encoder_2": "lora_te2_"}[part]
        if not xl:
            converted = {key.replace("lora_te1_", "lora_te_", 1): value for key, value in converted.items()}
        modules = [key[len(part) + 1:-len(".lora_A.weight")] for key in peft if key.endswith(".lora_A.weight")]
        names = {module: prefix + module.replace(".", "_") for module in modules}
        if (2 * len(modules) != len(own) or len(converted) != 3 * len(modules)
                or any(f"{name}.{matrix}.weight" not in converted for name in names.values()
                       for matrix in ("lora_down", "lora_up"))):
            raise RayboothError(f"{weights}: only part of the {part}'s adapter converts to kohya's format")
        for module, name in names.items():
            rank = converted[f"{name}.lora_down.weight"].shape[0]
            alpha = _alpha(module.removeprefix("text_model."), part, config, settings, rank)
            converted[f"{name}.alpha"] = torch.tensor(alpha)
        kohya.update(converted)
    if not kohya:
        raise RayboothError(f"{weights} holds no LoRA weights")
    return kohya


def export_kohya(lora_dir: Path, output_file: Path, half: bool = False, overwrite: bool = False) -> Path:
    """Write the adapter in `lora_dir` (a `train --use_lora` output) in kohya's format; returns the file."""
    import torch

    folder = Path(lora_dir).expanduser().absolute()
    if not is_lora(folder) and (folder / "model_index.json").is_file():
        raise RayboothError(f"{folder} is a full pipeline, not a LoRA adapter: export it with --format single-file")
    weights = lora_weights_file(folder)
    output = check_output_file(output_file, overwrite, reads=(weights,))
    state = kohya_state(weights)
    if half:  # the matrices; alphas stay fp32 scalars, as kohya's loaders read them with .item()
        state = {key: value if key.endswith(".alpha") else value.to(torch.float16) for key, value in state.items()}
    return write_safetensors(output, state, False, {"raybooth_source": str(weights)})
