"""Data parallelism around the training step: the trained modules in DDP, built so that a CUDA
graph can capture its all-reduce (graphs.py), and set up for one step's 4 GB of fp32 gradients
at SD-1.5 size as bench/studies/ddp_levers.py measured: gradients as views of the buckets (no copy),
100 MB buckets (fewer, larger all-reduces). A bf16 all-reduce was slower there."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch.nn.parallel import DistributedDataParallel

from raybooth.config.fields import DDP_BUCKET_MB


def wrap(module: torch.nn.Module, stream: torch.cuda.Stream | None = None,
         bucket_mb: int = DDP_BUCKET_MB) -> DistributedDataParallel:
    """`module` in DDP on its own device. Gradients are views of DDP's all-reduce buckets: no
    copy back after each all-reduce, and one gradient-sized buffer less. A CUDA graph that is to
    capture the all-reduce asks for DDP to be built on the stream it captures on: `stream`."""
    device = next(module.parameters()).device
    options = dict(bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
    if device.type != "cuda":
        return DistributedDataParallel(module, **options)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return DistributedDataParallel(module, device_ids=[device], **options)


def data_parallel(models, stream: torch.cuda.Stream | None = None, bucket_mb: int = DDP_BUCKET_MB):
    """`models` (models/modules.DreamBoothModels) with the trained modules in DDP, each on its own
    device (the UNet and the text encoders may sit on two GPUs of one worker)."""
    encoders = ({name: wrap(module, stream, bucket_mb) for name, module in models.text_encoders().items()}
                if models.train_text_encoder else {})
    return replace(models, unet=wrap(models.unet, stream, bucket_mb), **encoders)
