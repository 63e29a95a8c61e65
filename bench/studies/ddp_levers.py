"""Issue 10: the graphed DDP step's levers, one at a time, without Ray (torchrun, one process a
GPU): gradients copied into DDP's buckets or kept as views of them, bucket sizes, a bf16
all-reduce, and bf16 weights whose fp32 masters the optimizer steps ("masters"). SD-1.5-sized random weights, 512 px, batch 1+1 per GPU, UNet and text encoder
trained, class latents cached, bf16 autocast, the step captured after DDP's 11 warm-up steps, as
`raybooth train` runs it. Rank 0 prints one JSON line per variant.

    torchrun --nproc_per_node N bench/studies/ddp_levers.py MODEL_DIR [VARIANT ...]   # default: every variant
    torchrun --nproc_per_node N bench/studies/ddp_levers.py MODEL_DIR trace          # where a step's time goes

`trace` profiles three replays of raybooth's set-up (views, 100 MB) and splits the step into GPU
compute, NCCL time that no compute kernel overlaps, and idle GPU: what multi-GPU adds to a step
is either exposed communication or compute slowed by the all-reduce beside it.

Each variant loads fresh modules: wrapping a module in DDP a second time would leave the first
wrapper's hooks on it.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: its shared helpers

import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import make_batch, seconds_per_step
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from raybooth.models.loading import load_for_training
from raybooth.train.graphs import GraphedStep
from raybooth.train.masters import train_bf16_weights
from raybooth.train.optim import make_optimizer
from raybooth.train.parallel import data_parallel
from raybooth.train.precision import Precision
from raybooth.train.step import DDP_GRAPH_WARMUP_STEPS, train_step

# (name, bucket MB, gradients as bucket views, comm hook or "masters": bf16 weights with fp32 masters)
VARIANTS = [("copied-25", 25, False, "none"), ("views-25", 25, True, "none"), ("views-100", 100, True, "none"),
            ("views-25-bf16", 25, True, "bf16"),
            ("views-100-bf16", 100, True, "bf16"), ("views-200", 200, True, "none"), ("views-400", 400, True, "none"),
            ("views-100-masters", 100, True, "masters")]


def copied_gradients(models, stream):
    """The DDP set-up before this bench: gradients copied into the buckets and back."""
    def wrap(module):
        with torch.cuda.stream(stream):
            return DistributedDataParallel(module, device_ids=[module.device])
    models.unet, models.text_encoder = wrap(models.unet), wrap(models.text_encoder)
    return models


def union_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trace_step(step, batch, replays: int = 3) -> dict:
    """Per replay, in ms: the span of its kernels, the compute kernels' union, the NCCL kernels'
    time outside that union (exposed), the compute kernels' summed time, and the idle rest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step(batch)
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower()) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    compute = [(s, e) for s, e, nccl in kernels if not nccl]
    nccl = [(s, e) for s, e, is_nccl in kernels if is_nccl]
    span = max(e for _, e, _ in kernels) - min(s for s, _, _ in kernels)
    busy_compute = union_us(compute)
    exposed = union_us(compute + nccl) - busy_compute
    per = 1e3 * replays
    return dict(kernels=len(kernels), span_ms=round(span / per, 2), compute_busy_ms=round(busy_compute / per, 2),
                compute_sum_ms=round(sum(e - s for s, e in compute) / per, 2),
                nccl_sum_ms=round(sum(e - s for s, e in nccl) / per, 2), nccl_exposed_ms=round(exposed / per, 2),
                idle_ms=round((span - union_us(compute + nccl)) / per, 2))


def measure(model_dir: str, world: int, bucket_mb: int, views: bool, hook: str, steps: int = 30,
            trace: bool = False) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    precision = Precision("bf16", device)
    models = load_for_training(Path(model_dir), device, device, precision.frozen_dtype, train_text_encoder=True)
    if hook == "masters":  # as `raybooth train --bf16_gradients` does it: before DDP, whose buckets take their dtype
        train_bf16_weights(models, precision)
    stream = torch.cuda.Stream()
    if world > 1:
        models = (data_parallel(models, stream, bucket_mb) if views else copied_gradients(models, stream))
        if hook == "bf16":  # each bucket averaged in bf16 (half the bytes), written back into the fp32 gradients
            for module in (models.unet, models.text_encoder):
                module.register_comm_hook(None, bf16_compress_hook)
    stepped = models.masters.masters if models.masters is not None else models.trainable_parameters()
    optimizer = make_optimizer(stepped, lr=5e-6)
    torch.manual_seed(1 + dist.get_rank() if world > 1 else 1)
    batch = make_batch(models, 1, cached=True)
    step = GraphedStep(lambda b: train_step(models, optimizer, precision, b, 1.0, 1.0),
                       lambda: optimizer.zero_grad(set_to_none=True), DDP_GRAPH_WARMUP_STEPS if world > 1 else 3,
                       stream)
    seconds, loss = seconds_per_step(step, batch, steps, warmup=DDP_GRAPH_WARMUP_STEPS + 2)
    if trace:
        return dict(step_ms=round(seconds * 1e3, 2), **trace_step(step, batch))
    return dict(step_ms=round(seconds * 1e3, 2), images_per_s=round(2 * world / seconds, 1), last_loss=round(loss, 5),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main(model_dir: str, *names: str) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120),
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    trace = "trace" in names
    variants = [variant for variant in VARIANTS if not names or variant[0] in names or (trace and variant[0] == "views-100")]
    single = [("single-gpu", 0, True, "none")] + [("single-gpu-masters", 0, True, "masters")
                                                  for name, *_ in variants if name.endswith("masters")]
    for name, bucket_mb, views, hook in (variants if world > 1 else single):
        try:
            row = measure(model_dir, world, bucket_mb, views, hook, trace=trace)
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is a result too
            row = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
        gc.collect()  # the variant's modules, optimizer and graph went with measure()'s frame
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if rank == 0:
            nccl = {key: value for key, value in os.environ.items() if key.startswith("NCCL_") and "NVLS" not in key}
            print(json.dumps(dict(gpus=world, variant=name, nccl=nccl, **row)), flush=True)
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
