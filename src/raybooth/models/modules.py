"""The modules one training worker holds, as one object the loss, the optimizer and the
checkpoints pass around (DreamBoothModels), and the module inside a DDP wrapper (unwrap)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DreamBoothModels:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None  # None once freed by --pre_compute_text_embeddings
    vae: torch.nn.Module
    noise_scheduler: object  # diffusers DDPMScheduler
    train_text_encoder: bool
    # 1, or 0 after --train_text_encoder_steps: scales the text encoders' gradient (a tensor a CUDA graph reads).
    text_encoder_gate: torch.Tensor | None = None
    masters: object | None = None  # masters.MasterWeights: with --bf16_gradients the optimizer steps fp32 masters
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (OpenCLIP bigG) encoder
    # Its models/families.ModelFamily (set by the family's load_for_training): how its prompts condition the UNet.
    family: object | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_encoder_device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders held, by their folder's name (none once freed)."""
        return {name: module for name, module in (("text_encoder", self.text_encoder),
                                                  ("text_encoder_2", self.text_encoder_2)) if module is not None}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + (list(self.text_encoders().values()) if self.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def encode_prompts(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the UNet's encoder_hidden_states, the pooled text embedding SDXL also takes, else None)."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden_states, pooled = self.family.encode_text(list(self.text_encoders().values()),
                                                     prompt_ids.to(self.text_encoder_device))
        if self.text_encoder_gate is not None and hidden_states.requires_grad:
            # The same values; the gradient flowing back is scaled by the gate.
            gate = self.text_encoder_gate.to(hidden_states.device)
            hidden_states = hidden_states.detach() + gate * (hidden_states - hidden_states.detach())
            if pooled is not None:
                pooled = pooled.detach() + gate * (pooled - pooled.detach())
        return hidden_states.to(self.device), None if pooled is None else pooled.to(self.device)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module
