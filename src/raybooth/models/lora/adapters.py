"""Training with LoRA: low-rank adapters beside frozen UNet and text encoder weights, saved in
diffusers' own file format with the settings they were trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from raybooth.errors import RayboothError
from raybooth.models.output import LORA_SETTINGS, LORA_WEIGHTS

if TYPE_CHECKING:  # only in hints: `generate` and `train` check their input without torch
    import torch


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_config(rank: int, alpha: float, targets: tuple[str, ...], use_dora: bool = False, dropout: float = 0.0):
    from peft import LoraConfig

    # "gaussian" as diffusers' train_dreambooth_lora.py: A random, B zero, so training starts at the base model.
    # With DoRA the magnitudes start as the base weights' row norms: again the base model, exactly.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      use_dora=use_dora, lora_dropout=dropout)


def add_text_encoder_adapter(text_encoder: torch.nn.Module, config, name: str,
                              state: dict[str, torch.Tensor] | None = None) -> None:
    """peft's own injection, which transformers' add_adapter only wraps: that of transformers
    5.24 demands peft >= 0.22, newer than any on PyPI (0.21.2). (Its load_adapter, which
    diffusers' load_lora_weights calls, does not: users can load our files with it.)"""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(config, text_encoder, name, state_dict=state)
    if state is not None:
        unexpected = [key for key in set_peft_model_state_dict(text_encoder, state, name).unexpected_keys
                      if "lora" in key]
        if unexpected:
            raise ValueError(f"the text encoder has no layer for {unexpected[0]}")


def add_adapters(unet: torch.nn.Module, text_encoder: torch.nn.Module, rank: int, alpha: float,
                 lora_text_encoder: bool, text_encoder_2: torch.nn.Module | None = None, *, use_dora: bool = False,
                 dropout: float = 0.0) -> None:
    """Freeze every base weight and add a LoRA adapter to the UNet (and the text encoders, SDXL's
    two, when `lora_text_encoder`); afterwards only adapter parameters require gradients. `use_dora`:
    DoRA adapters (a magnitude vector beside A and B); `dropout`: on the adapters' input, in train
    mode only."""
    if rank < 1:
        raise RayboothError(f"LoRA rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise RayboothError(f"LoRA alpha must be positive, got {alpha}")
    encoders = [encoder for encoder in (text_encoder, text_encoder_2) if encoder is not None]
    for module in [unet, *encoders]:
        module.requires_grad_(False)
    unet.add_adapter(_lora_config(rank, alpha, UNET_TARGETS, use_dora, dropout))
    if lora_text_encoder:
        for encoder in encoders:
            add_text_encoder_adapter(encoder, _lora_config(rank, alpha, TEXT_ENCODER_TARGETS, use_dora, dropout),
                                     "default")
    # peft gives adapters the base layer's dtype; a bf16/fp16 base would round small updates away.
    for parameter in [p for module in [unet, *encoders] for p in adapter_parameters(module)]:
        parameter.data = parameter.data.float()


def adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters; the base weights are frozen by `add_adapters`."""
    return [p for p in module.parameters() if p.requires_grad]


def add_to_models(models, cfg) -> None:
    """`train --use_lora` on a worker: adapters on the frozen modules that `load_for_training(...,
    lora=True)` loaded, before any DDP wrapping; the text encoder's only where it is trained."""
    add_adapters(models.unet, models.text_encoder, cfg.lora_rank, cfg.adapter_alpha(), models.train_text_encoder,
                 models.text_encoder_2, use_dora=cfg.use_dora, dropout=cfg.lora_dropout)
    models.family.freeze_unused(models)  # adapters where the conditioning never looks could not learn


def save_output(models, folder: Path, cfg, model_dir: Path, resolution: int) -> None:
    """What `train --use_lora` leaves in --output_dir (beside the training log): the adapter and
    the settings it was trained with."""
    save_adapters(models.unet, models.text_encoder, folder, models.text_encoder_2)
    settings = {"base_model": str(model_dir), "rank": cfg.lora_rank, "alpha": cfg.adapter_alpha(),
                "use_dora": cfg.use_dora, "lora_dropout": cfg.lora_dropout, "optimizer": cfg.optimizer,
                "unet_targets": list(UNET_TARGETS),
                "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if models.train_text_encoder else None,
                "resolution": resolution, "learning_rate": cfg.learning_rate(),
                "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt}
    (Path(folder) / LORA_SETTINGS).write_text(json.dumps(settings, indent=1))


def fuse_adapters(module: torch.nn.Module) -> torch.nn.Module:
    """Merge a module's live adapters into its base weights, as `load_adapters` does at scale 1:
    for a copy that only generates."""
    if getattr(module, "peft_config", None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer) and not layer.merged:
                layer.merge()
    return module


def save_adapters(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, folder: Path,
                  text_encoder_2: torch.nn.Module | None = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` in diffusers' LoRA format, which
    `StableDiffusionPipeline.load_lora_weights(folder)` (StableDiffusionXLPipeline's for SDXL) reads
    as is. Modules may be DDP-wrapped; a text encoder without an adapter is left out."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from raybooth.models.modules import unwrap

    arguments = {}
    for name, module in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        module = unwrap(module) if module is not None else None
        if module is None or not getattr(module, "peft_config", None):
            continue
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        if name != "unet":
            # DoRA's magnitudes, as "<module>.lora_magnitude_vector.weight": diffusers hands text-encoder
            # adapters to transformers' load_adapter, whose renaming (transformers 5) gives a bare
            # "...lora_magnitude_vector" key no parameter and drops it silently; peft reads both spellings.
            state = {f"{k}.weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in state.items()}
        arguments[f"{name}_lora_layers"] = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        # Without the adapter config diffusers would assume alpha == rank and load at the wrong scale.
        # Dropout is for training alone (raybooth_lora.json records it): diffusers' load_lora_weights adds
        # the UNet's adapter in train mode, and with the trained dropout in here it would drop while sampling.
        arguments[f"{name}_lora_adapter_metadata"] = {**module.peft_config["default"].to_dict(), "lora_dropout": 0.0}
    if "unet_lora_layers" not in arguments:
        raise ValueError("the UNet has no LoRA adapter to save (call add_adapters first)")
    # SDXL's writer is the one that takes a second text encoder; for the others the two write alike.
    writer = StableDiffusionXLPipeline if "text_encoder_2_lora_layers" in arguments else StableDiffusionPipeline
    writer.save_lora_weights(Path(folder), weight_name=LORA_WEIGHTS, **arguments)
    return Path(folder) / LORA_WEIGHTS
