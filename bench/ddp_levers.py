"""Issue 10: the graphed DDP step's levers, one at a time, without Ray (torchrun, one process a
GPU): gradients copied into DDP's buckets or kept as views of them, bucket sizes, and a bf16
all-reduce. SD-1.5-sized random weights, 512 px, batch 1+1 per GPU, UNet and text encoder
trained, class latents cached, bf16 autocast, the step captured after DDP's 11 warm-up steps, as
`raybooth train` runs it. Rank 0 prints one JSON line per variant.

    torchrun --nproc_per_node N bench/ddp_levers.py MODEL_DIR [VARIANT ...]   # default: every variant

Each variant loads fresh modules: wrapping a module in DDP a second time would leave the first
wrapper's hooks on it.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from levers import make_batch, seconds_per_step
from raybooth.graphs import GraphedStep
from raybooth.models import load_for_training
from raybooth.parallel import data_parallel
from raybooth.stepping import DDP_GRAPH_WARMUP_STEPS
from raybooth.training import Precision, make_optimizer, train_step

# (name, bucket MB, gradients as bucket views, comm hook)
VARIANTS = [("copied-25", 25, False, "none"), ("views-25", 25, True, "none"), ("views-100", 100, True, "none"),
            ("views-25-bf16", 25, True, "bf16"),
            ("views-100-bf16", 100, True, "bf16"), ("views-200", 200, True, "none"), ("views-400", 400, True, "none")]


def copied_gradients(models, stream):
    """The DDP set-up before this bench: gradients copied into the buckets and back."""
    def wrap(module):
        with torch.cuda.stream(stream):
            return DistributedDataParallel(module, device_ids=[module.device])
    models.unet, models.text_encoder = wrap(models.unet), wrap(models.text_encoder)
    return models


def measure(model_dir: str, world: int, bucket_mb: int, views: bool, hook: str, steps: int = 30) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    precision = Precision("bf16", device)
    models = load_for_training(Path(model_dir), device, device, precision.frozen_dtype, train_text_encoder=True)
    stream = torch.cuda.Stream()
    if world > 1:
        models = (data_parallel(models, stream, bucket_mb) if views else copied_gradients(models, stream))
        if hook == "bf16":  # each bucket averaged in bf16 (half the bytes), written back into the fp32 gradients
            for module in (models.unet, models.text_encoder):
                module.register_comm_hook(None, bf16_compress_hook)
    optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    torch.manual_seed(1 + dist.get_rank() if world > 1 else 1)
    batch = make_batch(models, 1, cached=True)
    step = GraphedStep(lambda b: train_step(models, optimizer, precision, b, 1.0, 1.0),
                       lambda: optimizer.zero_grad(set_to_none=True), DDP_GRAPH_WARMUP_STEPS if world > 1 else 3,
                       stream)
    seconds, loss = seconds_per_step(step, batch, steps, warmup=DDP_GRAPH_WARMUP_STEPS + 2)
    return dict(step_ms=round(seconds * 1e3, 2), images_per_s=round(2 * world / seconds, 1), last_loss=round(loss, 5),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main(model_dir: str, *names: str) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120),
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    variants = [variant for variant in VARIANTS if not names or variant[0] in names]
    for name, bucket_mb, views, hook in (variants if world > 1 else [("single-gpu", 0, True, "none")]):
        try:
            row = measure(model_dir, world, bucket_mb, views, hook)
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
