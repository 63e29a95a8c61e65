"""The modules one training worker holds, as one object the loss, the optimizer and the
checkpoints pass around (DreamBoothModels), and the module inside a DDP wrapper (unwrap)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DreamBoothModels:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # diffusers DDPMScheduler
    train_text_encoder: bool
    # 1, or 0 after --train_text_encoder_steps: scales the text encoder's gradient (a tensor a CUDA graph reads).
    text_encoder_gate: torch.Tensor | None = None
    masters: object | None = None  # masters.MasterWeights: with --bf16_gradients the optimizer steps fp32 masters

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_encoder_device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + ([self.text_encoder] if self.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def encode_prompts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden_states = self.text_encoder(prompt_ids.to(self.text_encoder_device))[0]
        if self.text_encoder_gate is not None and hidden_states.requires_grad:
            # The same values; the gradient flowing back is scaled by the gate.
            detached = hidden_states.detach()
            hidden_states = detached + self.text_encoder_gate.to(detached.device) * (hidden_states - detached)
        return hidden_states.to(self.device)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module
