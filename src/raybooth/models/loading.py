"""Loading a pipeline folder's parts for training: the UNet, text encoders, VAE and noise scheduler
as one training worker needs them, its tokenizers and prompt ids, and the precision and attention
kernels they run in. torch, diffusers and transformers are imported where used: the driver checks
prompts against the tokenizer before it imports them, so bad input fails at once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the driver checks model folders without it, so bad input fails at once
    import torch


def tokenize(tokenizer, prompt: str, max_length: int | None = None) -> np.ndarray:
    """Prompt ids padded to the text encoder's full context, as SD was trained (or to `max_length`:
    diffusers' --tokenizer_max_length)."""
    return tokenizer(prompt, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="np").input_ids[0].astype(np.int64)


def half_precision_dtype() -> torch.dtype:
    """bf16 on GPUs that compute in it (Ampere and later), else fp16: older GPUs only emulate bf16."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def use_flash_attention(device: torch.device | str) -> None:
    """PyTorch's flash attention in place of cuDNN's, its first choice on an H100: cuDNN's builds a
    plan per attention shape when it first runs it (1.4-5.3 s of the first batch of images, 2.3 s of
    a first training step at 1+1), for later calls 3-10% faster (bench/RESULTS.md). A large training
    step asks for cuDNN's again (train/step.training_attention): there it is much faster."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_tokenizer(model_dir: Path, subfolder: str = "tokenizer"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, subfolder=subfolder)


def load_tokenizers(model_dir: Path) -> list:
    """Every tokenizer of the folder's family, in the order their ids stack (SDXL has two)."""
    from raybooth.models.folders import model_family

    return [load_tokenizer(model_dir, name) for name in model_family(model_dir).tokenizers]


def prompt_ids(tokenizers: list, prompt: str, max_length: int | None = None) -> np.ndarray:
    """A prompt's ids as its family's text encoders take them: (tokens,) for one tokenizer,
    (tokenizers, tokens) for several."""
    ids = [tokenize(tokenizer, prompt, max_length) for tokenizer in tokenizers]
    return ids[0] if len(ids) == 1 else np.stack(ids)


def load_for_training(model_dir: Path, device: torch.device, text_encoder_device: torch.device,
                      frozen_dtype: torch.dtype, train_text_encoder: bool, lora: bool = False,
                      vae_dir: Path | None = None):
    """The models one training worker needs (models/modules.DreamBoothModels), loaded as the
    folder's family loads them: trained modules in fp32, frozen ones in `frozen_dtype`."""
    from raybooth.models.folders import model_family

    return model_family(model_dir).load_for_training(model_dir, device, text_encoder_device, frozen_dtype,
                                                     train_text_encoder, lora, vae_dir)


def save_trained_modules(models, folder: Path) -> None:
    """The modules training changed, in their diffusers/transformers folder layout."""
    from raybooth.models.modules import unwrap

    unwrap(models.unet).save_pretrained(folder / "unet")
    if models.train_text_encoder:
        for name, module in models.text_encoders().items():
            unwrap(module).save_pretrained(folder / name)
