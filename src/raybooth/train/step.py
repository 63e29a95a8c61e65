"""The training step as the worker's loop calls it: captured once as a CUDA graph and replayed
where that can be done (graphs.py), compiled by Inductor with --compile, eager otherwise; its
attention run by cuDNN's kernels where they pay."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from raybooth.models.modules import DreamBoothModels
from raybooth.train.graphs import GraphedStep
from raybooth.train.loss import Batch, Loss, dreambooth_loss
from raybooth.train.optim import graph_blocker
from raybooth.train.policy import uses_cudnn_attention
from raybooth.train.precision import Precision


def train_step(models: DreamBoothModels, optimizer: torch.optim.Optimizer, precision: Precision,
               batch: Batch | list[Batch], prior_loss_weight: float, max_grad_norm: float, *,
               offset_noise: bool = False, snr_gamma: float | None = None) -> Loss:
    """One optimizer step on one batch of instance + class examples, or on micro-batches whose
    gradients add up (each loss divided by their number: the step their union would take; DDP
    all-reduces each one's, no no_sync, so it stays capturable). Gradients are left for the
    caller to clear (`optimizer.zero_grad`), so that a CUDA graph can capture the step whole."""
    micro_batches = batch if isinstance(batch, list) else [batch]
    losses = []
    for micro_batch in micro_batches:
        with precision.autocast():
            loss = dreambooth_loss(models, micro_batch, prior_loss_weight, offset_noise=offset_noise,
                                   snr_gamma=snr_gamma)
        precision.backward(loss.total / len(micro_batches) if len(micro_batches) > 1 else loss.total)
        losses.append(loss)
    if models.masters is not None:  # bf16 weights: the optimizer steps their fp32 masters
        models.masters.step(optimizer, max_grad_norm)
    else:
        precision.step(optimizer, models.trainable_parameters(), max_grad_norm)
    if len(losses) == 1:
        return Loss(loss.total.detach(), loss.instance.detach(), loss.prior.detach())
    return Loss(*(torch.stack([getattr(one, part) for one in losses]).mean().detach()
                  for part in ("total", "instance", "prior")))


# DDP settles its gradient buckets over its first iterations; PyTorch asks for 11 eager ones
# before a step with DDP's all-reduce in it is captured.
DDP_GRAPH_WARMUP_STEPS = 11


def use_cuda_graph(cfg, precision: Precision, device: torch.device, text_encoder_device: torch.device,
                   say: Callable[[str], None] = lambda message: None) -> bool:
    """Graphs need one device per worker (no cross-GPU text encoder), no loss scaler (fp16), and
    options whose step can be captured; where only the options stand in the way, `say` why."""
    if not (cfg.cuda_graphs and device.type == "cuda" and text_encoder_device == device and precision.scaler is None):
        return False
    blocker = graph_blocker(cfg)
    if blocker is not None:
        say(f"no CUDA graph with {blocker}: the step runs eagerly")
    return blocker is None


# cuDNN's attention first, then the rest in PyTorch's order. At SD 1.5's 64x64 self-attention (8
# heads of 40 channels, a size flash attention runs as 64) forward and backward took 17.4 against
# 30.5 ms at batch 64 on an H100 (bench/studies/attention.py). raybooth turns cuDNN's off elsewhere
# (models.use_flash_attention): its plan for each new shape delays a first image.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_attention(cudnn: bool) -> contextlib.AbstractContextManager:
    """The attention kernels a step runs with: cuDNN's first (`cudnn`), or as set for the process."""
    return sdpa_kernel(CUDNN_FIRST, set_priority=True) if cudnn else contextlib.nullcontext()


def compiled_for_training(models, encodes_images: bool = True):
    """The models as --compile's step calls them: the UNet (DDP's wrapper included, which lets
    Dynamo split the graph at DDP's buckets) and, when the step encodes images, the VAE's encoder
    compiled by Inductor for the step's fixed shapes. Its fused kernels (GroupNorm with SiLU,
    residual additions, layouts) took 22-31% off a step at batch 32 on an H100, in or out of a
    CUDA graph (bench/RESULTS.md). Samples, validation and saving keep the eager UNet, and the
    crops encoded ahead of the step (batches.py) the eager encoder: their shapes would each cost
    a compile."""
    if encodes_images:
        models.vae.encoder.compile(dynamic=False)  # in place: only the step encodes images from here on
    return dataclasses.replace(models, unet=torch.compile(models.unet, dynamic=False))


def make_step(models, optimizer: torch.optim.Optimizer, precision: Precision, cfg,
              graph_stream: torch.cuda.Stream | None, world_size: int, encodes_images: bool = True):
    """The step as called in the loop: a CUDA graph captured on `graph_stream`, or eager without one;
    with --compile, Inductor's code runs in either. `encodes_images`: whether its batches hold
    pixels for the VAE to encode."""
    cudnn_attention = uses_cudnn_attention(cfg, models.device.type)
    if cfg.compile:
        models = compiled_for_training(models, encodes_images)

    def step(batch):
        with training_attention(cudnn_attention):  # read when a step runs eagerly, is compiled or captured
            return train_step(models, optimizer, precision, batch, cfg.prior_loss_weight, cfg.max_grad_norm,
                              offset_noise=cfg.offset_noise, snr_gamma=cfg.snr_gamma)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    if graph_stream is not None:
        return GraphedStep(step, zero_grad, DDP_GRAPH_WARMUP_STEPS if world_size > 1 else 3, graph_stream)
    return lambda batch: (step(batch), zero_grad())[0]
