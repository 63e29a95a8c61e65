"""Helpers the benchmarks and the studies share: a training batch of random pixels, a step's time
on the GPU, and the GPU's bf16 matmul peak (the denominator of MFU)."""

from __future__ import annotations

import json
import time

import torch

from raybooth.train.loss import Batch, latent_distribution

DEVICE = torch.device("cuda")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def make_batch(models, pairs: int, cached: bool) -> Batch:
    pixels = torch.rand(2 * pairs, 3, 512, 512, device=DEVICE) * 2 - 1
    ids = torch.randint(0, 49408, (2 * pairs, 77), device=DEVICE)
    if not cached:
        return Batch(pixels, ids)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        mean, std = latent_distribution(models.vae, pixels[pairs:])
    return Batch(pixels[:pairs], ids, mean, std)


def seconds_per_step(step, batch: Batch, steps: int, warmup: int = 5) -> tuple[float, float]:
    """Steady time of `step(batch)` after `warmup` steps (graph capture, kernel loading), and
    the last step's loss."""
    for _ in range(warmup):
        step(batch)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    last_loss = loss.total.item()  # waits for the last step
    return (time.perf_counter() - started) / steps, last_loss


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    peak = 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12
    emit(what="bf16 matmul peak TFLOP/s", value=round(peak))
    return peak
