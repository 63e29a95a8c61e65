"""Issue 5, target 4: the MFU of raybooth's training step at large batches, and where its GPU
time goes. One fresh process per call (a batch that runs out of memory leaves nothing behind for
the next); prints one JSON line.

    python bench/mfu.py MODEL_DIR PAIRS [--contiguous] [--cudnn-attention] [--bf16-weights] [--eager]
                        [--compile | --compile-blocks] [--known-latents] [--steps=N] [--profile] [--ops]

By default the step is the one raybooth trains on one GPU: class latents cached, UNet channels-last,
flash attention, fp32 weights under bf16 autocast, text encoder trained, CUDA graph. FLOPs are
counted with torch.utils.flop_counter on an eager step; the peak is a bf16 matmul measured here.
`--profile` adds the GPU time of three eager steps by kind of kernel, the 25 costliest kernels, and
each part of the step timed alone (VAE encode of the instance images, forward, backward, optimizer);
`--ops` the GPU time by PyTorch operator and input shapes. `--bf16-weights` trains bf16 copies of
the weights over fp32 masters, computing without autocast, as --bf16_gradients does.
`--compile` compiles the whole UNet and the VAE's encoder with Inductor as `raybooth train --compile`
does, `--compile-blocks` only the UNet's ResNet and transformer blocks (one compile per block shape)
and the VAE's encoder; the first step's seconds (compiling) are reported apart. `--known-latents`
gives the instance rows as latent distributions too, as raybooth's batches do once each crop was
drawn (batches.py): the step runs no VAE. `--steps=N` times N steps (10 by default) and reports
each ten's milliseconds as well: a GPU that slows under sustained load shows there.
`--cudnn-attention` runs the step's attention with cuDNN's kernels first, as `raybooth train
--cudnn_attention` does (stepping.training_attention); the first five steps' seconds (cuDNN's
plans built, the graph captured) are reported.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
from common import make_batch, matmul_peak

from raybooth.models.loading import load_for_training, use_flash_attention
from raybooth.train.graphs import GraphedStep
from raybooth.train.loss import Batch, dreambooth_loss, latent_distribution
from raybooth.train.masters import train_bf16_weights
from raybooth.train.optim import make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import compiled_for_training, train_step, training_attention

DEVICE = torch.device("cuda")
# Kernel names to kinds, first match wins: the optimizer's multi-tensor kernels include the
# gradient clipping's norm, and cuDNN's attention kernels say "sdpa".
KINDS = (("attention", ("flash", "fmha", "sdpa", "attention")),
         ("optimizer", ("adam", "multi_tensor")),
         ("matmul/convolution", ("gemm", "xmma", "cutlass", "nvjet", "conv", "cudnn", "dgrad", "wgrad", "fprop",
                                 "implicit", "cublas")),
         ("normalization", ("norm", "moments", "fusedparams", "internalgradients", "welford")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(mark in name for mark in marks)), "element-wise/copies")


def timed(fn, repeats: int = 5) -> float:
    """Milliseconds of `fn()` on the GPU, averaged over `repeats` after one call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def by_operator(eager, zero, batch) -> list:
    """The 30 costliest (operator, input shapes) by GPU time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(2):
            eager(batch)
            zero()
        torch.cuda.synchronize()
    rows = [(event.self_device_time_total / 1e3 / 2, event.count // 2, event.key, str(event.input_shapes)[:120])
            for event in prof.key_averages(group_by_input_shape=True)
            if event.device_type == torch.autograd.DeviceType.CPU and event.self_device_time_total > 0]
    rows.sort(reverse=True)
    return [[round(ms, 2), count, key, shapes] for ms, count, key, shapes in rows[:30]]


def profile(models, optimizer, precision, batch, eager, zero) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eager(batch)
            zero()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        ms = event.self_device_time_total / 1e3 / 3  # per step
        if ms <= 0:
            continue
        by_kind[kind_of(event.key)] += ms
        kernels.append((ms, event.count // 3, kind_of(event.key), event.key[:110]))
    kernels.sort(reverse=True)

    def forward():
        with precision.autocast():
            return dreambooth_loss(models, batch, 1.0)

    def vae():
        with torch.no_grad(), precision.autocast():
            latent_distribution(models.vae, batch.pixels)

    def backward():
        forward().total.backward()

    def optimizer_step():
        if models.masters is not None:  # the masters' gradients stay from the first call
            optimizer.step()
            models.masters.push()
        else:
            precision.step(optimizer, models.trainable_parameters(), 1.0)

    def vae_alone():  # no autocast: the VAE's weights are bf16 already
        with torch.no_grad():
            latent_distribution(models.vae, batch.pixels)

    parts = {}
    if batch.pixels is not None:
        parts = {"vae_encode_ms": timed(vae), "vae_encode_no_autocast_ms": timed(vae_alone)}
        models.vae.to(memory_format=torch.channels_last)
        parts["vae_encode_channels_last_ms"] = timed(vae)
        parts["vae_encode_channels_last_no_autocast_ms"] = timed(vae_alone)
        models.vae.to(memory_format=torch.contiguous_format)
    parts["forward_ms"] = timed(forward)
    parts["forward_and_backward_ms"] = timed(backward)
    parts["optimizer_ms"] = timed(optimizer_step)  # on the gradients the last backward left
    zero()
    return {"gpu_ms_by_kind": {kind: round(ms, 1) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "gpu_ms_total": round(sum(by_kind.values()), 1),
            "parts": {name: round(ms, 1) for name, ms in parts.items()},
            "top_kernels": [[round(ms, 2), count, kind, name] for ms, count, kind, name in kernels[:25]]}


BLOCKS = {"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"}


def compiled(models, flags, encodes_images: bool):
    """`--compile`: the models as `raybooth train --compile` compiles them (the whole UNet and,
    when the step encodes images, the VAE's encoder); `--compile-blocks`: the UNet's blocks alone,
    one compile per block shape, and the VAE's encoder."""
    if "--compile" in flags:
        return compiled_for_training(models, encodes_images)
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # a compile per block shape, not dynamic shapes
    for module in models.unet.modules():
        if type(module).__name__ in BLOCKS:
            module.compile(dynamic=False)
    models.vae.encoder.compile(dynamic=False)
    return models


def main(model_dir: str, pairs: int, *flags: str) -> None:
    row: dict = {"pairs": pairs, "flags": flags, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    peak = matmul_peak()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as raybooth's worker sets them
    use_flash_attention(DEVICE)  # as raybooth's worker sets it; the step's attention as training_attention says
    cudnn = "--cudnn-attention" in flags
    precision = Precision("bf16", DEVICE)
    models = load_for_training(model_dir, DEVICE, DEVICE, precision.frozen_dtype, True)
    if "--contiguous" not in flags:
        models.unet.to(memory_format=torch.channels_last)
    if "--bf16-weights" in flags:
        train_bf16_weights(models, precision)
        optimizer = make_optimizer(models.masters.masters, lr=5e-6)
    else:
        optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    batch = make_batch(models, pairs, cached=True)
    if "--known-latents" in flags:
        with torch.no_grad():
            mean, std = latent_distribution(models.vae, batch.pixels)
        batch = Batch(None, batch.prompt_ids, torch.cat([mean, batch.latent_mean]), torch.cat([std, batch.latent_std]))
    steps = next((int(flag.split("=")[1]) for flag in flags if flag.startswith("--steps=")), 10)

    def eager(b):
        with training_attention(cudnn):
            return train_step(models, optimizer, precision, b, 1.0, 1.0)

    zero = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            eager(batch)
            zero()
        flop = counter.get_total_flops()
        if any(flag.startswith("--compile") for flag in flags):
            models = compiled(models, flags, batch.pixels is not None)
            started = time.perf_counter()
            eager(batch).total.item()
            zero()
            row["first_compiled_step_s"] = round(time.perf_counter() - started, 1)
        step = (lambda b: (eager(b), zero())[0]) if "--eager" in flags else GraphedStep(eager, zero)
        started = time.perf_counter()
        for _ in range(5):
            step(batch)
        torch.cuda.synchronize()
        row["first_5_steps_s"] = round(time.perf_counter() - started, 2)  # kernels loaded, plans built, graph captured
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps // 10 + 1)]
        started = time.perf_counter()
        marks[0].record()
        for index in range(steps):
            loss = step(batch)
            if index % 10 == 9 and index // 10 + 1 < len(marks):
                marks[index // 10 + 1].record()
        loss.total.item()
        seconds = (time.perf_counter() - started) / steps
        row["ms_per_ten"] = [round(a.elapsed_time(b) / 10, 1) for a, b in zip(marks, marks[1:])]
        row |= {"step_ms": round(seconds * 1e3, 1), "images_per_s": round(2 * pairs / seconds, 1),
                "tflop_per_step": round(flop / 1e12, 2), "tflops": round(flop / seconds / 1e12, 1),
                "peak_tflops": round(peak), "mfu": round(flop / seconds / 1e12 / peak, 3),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        del step  # the graph's memory pool
        torch.cuda.empty_cache()
        if "--profile" in flags:
            row |= profile(models, optimizer, precision, batch, eager, zero)
        if "--ops" in flags:
            row["top_operators"] = by_operator(eager, zero, batch)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
