"""Levers for issue 5, measured one at a time on one GPU (SD-1.5-sized random weights, 512 px):
start-up costs (Ray, a Ray Train worker group, model loading), the training step (eager, CUDA
graph, cached class latents, channels_last, batch size and MFU) and generation (batch size,
fused QKV, sampler and its solver error). Prints one JSON line per measurement.

    python bench/studies/levers.py MODEL_DIR [SECTION ...]    # sections: startup load latents step mfu mfu-cl mfu-cl-cudnn mfu-compile generate
                                                      # samplers first-generate first-generate-flash
                                                      # samplers-no-cudnn-attention; each in a fresh process:
                                                      # first, first-channels-last, first-no-cudnn-attention
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: its shared helpers

import gc
import sys
import time

import torch
from common import DEVICE, emit, make_batch, matmul_peak, seconds_per_step

from raybooth.models.loading import load_for_training
from raybooth.train.graphs import GraphedStep
from raybooth.train.loss import latent_distribution
from raybooth.train.optim import make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step



def startup() -> None:
    started = time.perf_counter()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    emit(what="import ray.train", s=round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    ray.init(logging_level="ERROR")
    emit(what="ray.init", s=round(time.perf_counter() - started, 1))

    def noop(config):
        ray.train.report({"t": time.time()})

    started = time.perf_counter()
    t0 = time.time()
    TorchTrainer(noop, scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True,
                                                              resources_per_worker={"CPU": 1, "GPU": 1})).fit()
    emit(what="TorchTrainer.fit of an empty loop, 1 GPU worker", s=round(time.perf_counter() - started, 1),
         since=t0)
    started = time.perf_counter()
    import ray.data
    ds = ray.data.from_items([{"i": i} for i in range(200)]).map_batches(lambda b: b)
    ds.materialize()
    emit(what="ray.data trivial materialize", s=round(time.perf_counter() - started, 1))
    ray.shutdown()


def load(model_dir: str) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    started = time.perf_counter()
    profiler.enable()
    load_for_training(model_dir, DEVICE, DEVICE, torch.bfloat16, True)
    torch.cuda.synchronize()
    profiler.disable()
    emit(what="load_for_training, first in a fresh process, profiled", s=round(time.perf_counter() - started, 1))
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    for attempt in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        load_for_training(model_dir, DEVICE, DEVICE, torch.bfloat16, True)
        torch.cuda.synchronize()
        emit(what=f"load_for_training (try {attempt})", s=round(time.perf_counter() - started, 1))

    from diffusers import UNet2DConditionModel
    for kwargs in (dict(device_map="cuda"), dict(low_cpu_mem_usage=True)):
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kwargs).to(DEVICE)
            torch.cuda.synchronize()
            emit(what=f"unet from_pretrained {kwargs}", s=round(time.perf_counter() - started, 1))
            del unet
        except Exception as error:  # noqa: BLE001
            emit(what=f"unet from_pretrained {kwargs}", error=repr(error)[:300])


def latents(model_dir: str) -> None:
    """The class latents as the worker computes them before training (200 images at 512 px, in
    chunks of 16; 2.1 s in run J): the first pass in a fresh process, a second, and with flash
    attention (the VAE's middle block attends) or channels_last."""
    from diffusers import AutoencoderKL

    from raybooth.train.crop_latents import normalize

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(DEVICE, torch.bfloat16)
    images = torch.randint(0, 256, (200, 3, 512, 512), dtype=torch.uint8, device=DEVICE)

    def encode(variant: str, chunk: int = 16) -> None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(images), chunk):
                latent_distribution(vae, normalize(images[start:start + chunk]))
        torch.cuda.synchronize()
        emit(what="class latents, 200 at 512 px", variant=variant, chunk=chunk, s=round(time.perf_counter() - started, 2))

    encode("first pass")
    encode("second pass")
    encode("second pass", chunk=40)
    torch.backends.cuda.enable_cudnn_sdp(False)
    encode("flash attention, first pass")
    encode("flash attention")
    vae.to(memory_format=torch.channels_last)
    encode("flash attention, channels_last, first pass")
    encode("flash attention, channels_last")






def measure_step(model_dir: str, name: str, pairs: int = 1, graph: bool = False, cached: bool = False,
                 channels_last: bool = False, benchmark: bool = False, flops: bool = False, steps: int = 20,
                 peak: float | None = None, compiled: bool = False) -> None:
    torch.backends.cudnn.benchmark = benchmark
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    precision = Precision("bf16", DEVICE)
    models = load_for_training(model_dir, DEVICE, DEVICE, precision.frozen_dtype, True)
    if channels_last:
        models.unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    batch = make_batch(models, pairs, cached)
    uncompiled = models.unet
    first_s = None
    if compiled:  # the UNet's forward and backward compiled by Inductor (its fused element-wise kernels)
        models.unet = torch.compile(uncompiled)
        started = time.perf_counter()
        train_step(models, optimizer, precision, batch, 1.0, 1.0)
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        first_s = round(time.perf_counter() - started, 1)
    eager = lambda b: train_step(models, optimizer, precision, b, 1.0, 1.0)  # noqa: E731
    zero = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731
    step = GraphedStep(eager, zero) if graph else (lambda b: (eager(b), zero())[0])
    seconds, loss = seconds_per_step(step, batch, steps)
    row = dict(what="step", name=name, pairs=pairs, step_ms=round(seconds * 1e3, 1),
               images_per_s=round(2 * pairs / seconds, 2), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               loss=round(loss, 4), first_compiled_step_s=first_s)
    if flops:
        from torch.utils.flop_counter import FlopCounterMode
        models.unet = uncompiled  # FLOPs counted on the eager modules: the same arithmetic
        with FlopCounterMode(display=False) as counter:
            eager(batch)
            zero()
        row["tflop_per_step"] = round(counter.get_total_flops() / 1e12, 2)
        row["tflops"] = round(counter.get_total_flops() / seconds / 1e12, 1)
        if peak:
            row["mfu"] = round(row["tflops"] / peak, 3)
    emit(**row)



def first_step(model_dir: str, channels_last: bool, cudnn_attention: bool = True) -> None:
    """The first step's cost (kernel loading, library heuristics) and the graphed step after it, in
    a fresh process: what a run pays once. The first eager step runs under the profiler, whose
    table of host time per op says where that time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    precision = Precision("bf16", DEVICE)
    models = load_for_training(model_dir, DEVICE, DEVICE, precision.frozen_dtype, True)
    if channels_last:
        models.unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(models.trainable_parameters(), lr=5e-6)
    batch = make_batch(models, 1, cached=True)
    step = GraphedStep(lambda b: train_step(models, optimizer, precision, b, 1.0, 1.0),
                       lambda: optimizer.zero_grad(set_to_none=True))
    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step(batch).total.item()
    first = time.perf_counter() - started
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    calls = []
    for _ in range(5):  # the other warm-up steps, then the capture and first replay
        started = time.perf_counter()
        step(batch).total.item()
        calls.append(round(time.perf_counter() - started, 2))
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(50):
        loss = step(batch)
    loss.total.item()
    emit(what="first step", channels_last=channels_last, cudnn_attention=cudnn_attention,
         first_step_s=round(first, 1), next_calls_s=calls,
         graph_step_ms=round((time.perf_counter() - started) / 50 * 1e3, 1))
    print(table, flush=True)


def samplers(model_dir: str, cudnn_attention: bool = True) -> None:
    """Class images as raybooth generate makes them (bf16 pipeline, batch 16 and 32): the model's
    own 50-step sampler against DPM-Solver++ at 25 and 20 steps; the first call's time too."""
    from diffusers import StableDiffusionPipeline

    from raybooth.generate.pipelines import use_sampler

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                       requires_safety_checker=False).to(DEVICE, torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    started = time.perf_counter()
    pipeline(["a photo of a dog"] * 16, num_inference_steps=2, output_type="np")
    emit(what="first pipeline call, batch 16, 2 steps", cudnn_attention=cudnn_attention,
         s=round(time.perf_counter() - started, 2))
    own = pipeline.scheduler
    for sampler, steps in (("model", 50), ("dpm++", 25), ("dpm++", 20)):
        pipeline.scheduler = own
        use_sampler(pipeline, sampler)
        for batch in (16, 32):
            prompts = ["a photo of a dog"] * batch
            pipeline(prompts, num_inference_steps=3, output_type="np")
            torch.cuda.synchronize()
            started = time.perf_counter()
            pipeline(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            emit(what="sampler", cudnn_attention=cudnn_attention, sampler=sampler, scheduler=type(pipeline.scheduler).__name__, steps=steps,
                 batch=batch, s=round(seconds, 2), images_per_s=round(batch / seconds, 2))


def first_generate(model_dir: str, cudnn_attention: bool) -> None:
    """What `raybooth generate` pays before its first images, in a fresh process: the pipeline's
    import and load, then the first batch of 16 at the seed's settings (50 steps, guidance 7.5),
    then the second; cuDNN's attention (PyTorch's choice) builds plans in the first call."""
    started = time.perf_counter()
    from diffusers import StableDiffusionPipeline
    imported = time.perf_counter() - started
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                       requires_safety_checker=False).to(DEVICE, torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    loaded = time.perf_counter() - started
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    calls = []
    for _ in range(3):
        begun = time.perf_counter()
        generator = [torch.Generator(DEVICE).manual_seed(i) for i in range(16)]
        pipeline(["a photo of a dog"] * 16, num_inference_steps=50, guidance_scale=7.5, generator=generator,
                 output_type="np")
        torch.cuda.synchronize()
        calls.append(round(time.perf_counter() - begun, 2))
    emit(what="first generation", cudnn_attention=cudnn_attention, import_s=round(imported, 1),
         import_and_load_s=round(loaded, 1), batches_of_16_s=calls, steady_images_per_s=round(16 / calls[-1], 2))




def generate(model_dir: str) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                       requires_safety_checker=False).to(DEVICE, torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    pndm = pipeline.scheduler

    def timed(name, batch, steps=50, scheduler=None, output_type="np"):
        pipeline.scheduler = scheduler or pndm
        prompts = ["a photo of a dog"] * batch
        pipeline(prompts[:batch], num_inference_steps=3, output_type=output_type)
        torch.cuda.synchronize()
        started = time.perf_counter()
        pipeline(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type=output_type)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        emit(what="generate", name=name, batch=batch, steps=steps, s=round(seconds, 2),
             images_per_s=round(batch / seconds, 2))

    for batch in (4, 16, 32):
        timed("pndm", batch)
    timed("pndm output pil", 16, output_type="pil")
    dpm = DPMSolverMultistepScheduler.from_config(pndm.config)
    timed("dpm++2m", 16, steps=25, scheduler=dpm)
    pipeline.unet.to(memory_format=torch.channels_last)
    timed("pndm channels_last", 16)
    pipeline.fuse_qkv_projections()
    timed("pndm channels_last + fused qkv", 16)
    pipeline.unfuse_qkv_projections()

    # Solver error: each sampler's latents against a 500-step DDIM solution of the same ODE, same
    # noise; smaller is closer. With random weights this compares solvers, not pictures.
    def final_latents(scheduler, steps):
        pipeline.scheduler = scheduler
        generator = [torch.Generator(DEVICE).manual_seed(i) for i in range(4)]
        return pipeline(["a photo of a dog"] * 4, num_inference_steps=steps, guidance_scale=7.5,
                        generator=generator, output_type="latent").images.float()

    reference = final_latents(DDIMScheduler.from_config(pndm.config), 500)
    for name, scheduler, steps in [("pndm", pndm, 50), ("ddim", DDIMScheduler.from_config(pndm.config), 50),
                                   ("dpm++2m", dpm, 25), ("dpm++2m", dpm, 20), ("pndm", pndm, 25)]:
        error = (final_latents(scheduler, steps) - reference).pow(2).mean().sqrt() / reference.std()
        emit(what="solver error vs 500-step DDIM", name=name, steps=steps, relative_rmse=round(error.item(), 4))


if __name__ == "__main__":
    model_dir, sections = sys.argv[1], set(sys.argv[2:]) or {"startup", "load", "step", "mfu", "generate"}
    emit(what="versions", torch=torch.__version__, gpu=torch.cuda.get_device_name())
    if sections & {"first", "first-channels-last", "first-no-cudnn-attention"}:
        first_step(model_dir, channels_last="first-channels-last" in sections,
                   cudnn_attention="first-no-cudnn-attention" not in sections)
    if "startup" in sections:
        startup()
    if "load" in sections:
        load(model_dir)
    if "latents" in sections:
        latents(model_dir)
    if "step" in sections:
        measure_step(model_dir, "eager (main today)")
        measure_step(model_dir, "cuda graph", graph=True)
        measure_step(model_dir, "cuda graph + cached class latents", graph=True, cached=True)
        measure_step(model_dir, "graph + cached + cudnn.benchmark", graph=True, cached=True, benchmark=True)
        measure_step(model_dir, "graph + cached + channels_last", graph=True, cached=True, channels_last=True)
    if "mfu" in sections:
        peak = matmul_peak()
        for pairs in (1, 4, 8, 16, 24):
            try:
                measure_step(model_dir, "graph + cached", pairs=pairs, graph=True, cached=True, flops=True,
                             steps=10, peak=peak)
            except torch.OutOfMemoryError:
                emit(what="step", pairs=pairs, error="out of memory")
                break
    if sections & {"mfu-cl", "mfu-cl-cudnn"}:  # as raybooth trains: channels-last UNet, flash attention (or cuDNN's)
        torch.backends.cuda.enable_cudnn_sdp("mfu-cl-cudnn" in sections)
        peak = matmul_peak()
        for pairs in (8, 16, 24, 32):
            try:
                measure_step(model_dir, f"graph + cached + channels_last, cudnn attention {'mfu-cl-cudnn' in sections}",
                             pairs=pairs, graph=True, cached=True, channels_last=True, flops=True, steps=10, peak=peak)
            except torch.OutOfMemoryError:
                emit(what="step", pairs=pairs, error="out of memory")
                break
            gc.collect()
            torch.cuda.empty_cache()
    if "mfu-compile" in sections:  # the largest batches, eager and graphed beside compiled
        peak = matmul_peak()
        for pairs in (8, 16):
            for name, options in (("graph + cached", dict(graph=True)), ("compiled UNet + cached", dict(compiled=True)),
                                  ("compiled UNet + graph + cached", dict(compiled=True, graph=True))):
                try:
                    measure_step(model_dir, name, pairs=pairs, cached=True, flops=True, steps=10, peak=peak, **options)
                except torch.OutOfMemoryError:
                    emit(what="step", name=name, pairs=pairs, error="out of memory")
                torch._dynamo.reset()  # compiled code holds the variant's modules
                gc.collect()
                torch.cuda.empty_cache()
    if "generate" in sections:
        generate(model_dir)
    if sections & {"first-generate", "first-generate-flash"}:
        first_generate(model_dir, cudnn_attention="first-generate-flash" not in sections)
    if sections & {"samplers", "samplers-no-cudnn-attention"}:
        samplers(model_dir, cudnn_attention="samplers-no-cudnn-attention" not in sections)
