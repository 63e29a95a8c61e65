"""The precision policy around the training step: autocast over fp32 master weights, fp16's loss
scaling, and bf16 weights that compute without autocast (masters.py)."""

from __future__ import annotations

import contextlib

import torch

from raybooth.models.loading import half_precision_dtype

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(mode: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs, full precision on CPU."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "bf16" if half_precision_dtype() == torch.bfloat16 else "fp16"
    return "no"


class Precision:
    """Mixed precision over fp32 master weights: the forward pass runs under autocast in
    `mode`'s dtype, weights and optimizer state stay fp32, and fp16 adds loss scaling.

    Pure bf16 weights (as in Ray's example) lose most AdamW updates: at lr 5e-6 an update is
    far below half a bf16 ulp of a typical weight and rounds away. fp32 masters keep them (with
    --bf16_gradients the modules compute on bf16 copies of them: masters.py).
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = resolve_precision(mode, device)
        self.device_type = device.type
        self.dtype = _DTYPES[self.mode]
        self.scaler = torch.amp.GradScaler(device.type) if self.mode == "fp16" else None
        self.in_weights_dtype = False

    def compute_in_weights_dtype(self) -> None:
        """For modules holding bf16 weights over fp32 masters (masters.py): they compute in their
        weights' dtype, without autocast. Autocast would run each norm in fp32 and cast its output
        back for the next layer: at batch 16+16 on an H100 the step took 14% longer that way
        (bench/RESULTS.md). PyTorch's bf16 norms still keep their statistics in fp32."""
        self.in_weights_dtype = True

    @property
    def frozen_dtype(self) -> torch.dtype:
        """For modules that are not trained (the VAE): they can live in the low-precision dtype."""
        return self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "no" or self.in_weights_dtype:
            return contextlib.nullcontext()
        # While a CUDA graph is captured, autocast's cache of cast weights would outlive the capture.
        capturing = self.device_type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=not capturing)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
             max_grad_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm, then step; returns the norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return grad_norm
