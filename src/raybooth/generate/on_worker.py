"""Images made on the training workers (class images before training, samples after, validation
grids), with the modules a worker holds rather than a second copy of the model in another
process; named, seeded and rendered as `raybooth generate` makes them, so a seed gives the same
image either way."""

from __future__ import annotations

from concurrent.futures import Future, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from raybooth.config.fields import inference_steps
from raybooth.files.writes import png_bytes, write_atomically
from raybooth.generate.pipelines import default_batch_size, inference_dtype, pipeline_settings, render, use_sampler
from raybooth.models.folders import model_family
from raybooth.models.lora import fuse_adapters
from raybooth.terminal.progress import ImageProgress


def pipeline_from_models(models, model_dir: Path, sampler: str, safety_checker: bool = False):
    """A generation pipeline over a training worker's modules, in the dtype and on the device that
    `raybooth generate` would load them with, so a seed gives the same image either way. The
    trained modules are copied (they stay in their training dtype), LoRA adapters fused into the copy
    as `raybooth generate --lora_weights_dir` fuses them; frozen modules are shared."""
    import copy

    from raybooth.models.modules import unwrap

    device = models.device
    dtype = inference_dtype("auto", device.type)

    def for_inference(module):
        module = unwrap(module)
        if module.dtype == dtype and module.device == device and not any(p.requires_grad for p in module.parameters()):
            return module
        return fuse_adapters(copy.deepcopy(module)).to(device, dtype).eval().requires_grad_(False)

    family = model_family(model_dir)
    # Text encoders freed by --pre_compute_text_embeddings are loaded again from model_dir.
    text_encoders = {name: for_inference(module) for name, module in models.text_encoders().items()}
    pipeline = family.pipeline_class().from_pretrained(
        model_dir, unet=for_inference(models.unet), vae=for_inference(models.vae), **text_encoders,
        **family.generation_options(safety_checker)).to(device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, sampler)
    return pipeline


def park_vae_decoder(models) -> None:
    """From now on, keep the VAE's decoder in host memory where the models are on a GPU: training
    steps only encode, and the decoder is 49.5 M of the SD VAE's 83.7 M weights, 94 MiB in bf16
    (the 1+1 run's peak fell from 15.63 to 15.54 GiB, under the diffusers script's 15.585: runs BB
    and BC in bench/RESULTS.md).
    Images made on the worker bring it back while they are made."""
    if models.device.type == "cuda":
        _move_decoder(models.vae, "cpu")


@contextmanager
def decoder_on_device(models) -> Iterator[None]:
    """The VAE whole on its device for the block (a pipeline decodes with it), parked again after
    where it was parked."""
    vae = models.vae
    parked_on = next(vae.decoder.parameters()).device
    parked = parked_on != vae.device  # the encoder's device
    if parked:
        _move_decoder(vae, vae.device)
    try:
        yield
    finally:
        if parked:
            _move_decoder(vae, parked_on)


def _move_decoder(vae, device) -> None:
    for part in (vae.decoder, vae.post_quant_conv):  # what decode() uses; post_quant_conv may be None
        if part is not None:
            part.to(device)


def write_pngs(folder: str, files: list[str], images: list[np.ndarray]) -> None:
    for file, image in zip(files, images):
        write_atomically(Path(folder) / file, png_bytes(Image.fromarray(image)))


def png_writer():
    """`write_pngs` as a Ray task on this node, whose folders are the ones this process sees."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(write_pngs).options(scheduling_strategy=here)


def ray_png_writes() -> Callable[[str, list[str], list[np.ndarray]], Future]:
    """`write_pngs` as Ray tasks on this node, a Future each. Its Ray worker starts now, while the
    pipeline loads, not after the first batch: Ray starts no idle workers ahead
    (cluster.start_local_ray), and a worker's start took about 1 s of the first image on a GPU
    machine (bench/RESULTS.md)."""
    writer = png_writer()
    writer.remote("", [], [])  # writes nothing; the worker stays for the writes
    return lambda folder, files, images: writer.remote(folder, files, images).future()


INTERRUPTED_WRITES_WAIT_S = 30.0  # for the writes in flight when the images' making is interrupted


def render_and_write(pipeline, rows: list[dict], folder: Path, batch_size: int, settings: dict,
                     progress: ImageProgress,
                     write: Callable[[str, list[str], list[np.ndarray]], Future]) -> list[np.ndarray]:
    """Images for `rows` (prompt, seed, file) from a pipeline in this process, written to
    `folder` whole or not at all. PNG encoding runs in other processes, `write`'s (Ray tasks, or
    local generation's own): in threads here it held up the GPU's work. Progress counts images
    once written, so what it says is made is on disk: interrupted (Ctrl-C), it waits a while for
    the writes in flight, which the clean-up that follows (Ray's shutdown) would cut short."""
    device = pipeline.device.type
    images: list[np.ndarray] = []
    writes: dict[Future, int] = {}  # in flight: images each
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            made = render(pipeline, chunk, device, settings)
            writes[write(str(folder), [row["file"] for row in chunk], made)] = len(made)
            images += made
            count_written(writes, progress, wait_s=0)
        count_written(writes, progress, wait_s=None)
    except BaseException:
        count_written(writes, progress, wait_s=INTERRUPTED_WRITES_WAIT_S, errors=False)
        raise
    return images


def count_written(writes: dict[Future, int], progress: ImageProgress, wait_s: float | None,
                  errors: bool = True) -> None:
    """Count the writes done into `progress`, waiting up to `wait_s` (None: until all are) for
    those in flight; a failed write raises, unless `errors` is off (the command fails anyway)."""
    done, _ = wait(writes, timeout=wait_s)
    for future in [future for future in writes if future in done]:  # in the order they began
        count = writes.pop(future)
        if not future.cancelled() and future.exception() is None:
            progress.update(count)
        elif errors:
            future.result()  # raises what the write raised


def make_images_on_worker(models, model_dir: Path, rows: list[dict], folder: Path, cfg, resolution: int, what: str,
                          say: Callable[[str], None], safety_checker: bool = False,
                          bar: bool = False) -> list[np.ndarray]:
    """A training worker's share of images (class images before training, samples after); with
    `bar`, a progress bar in the driver's terminal."""
    if not rows:
        return []
    write = ray_png_writes()
    batch_size = cfg.sample_batch_size or default_batch_size(models.device.type == "cuda")
    settings = pipeline_settings(inference_steps(cfg.sampler, cfg.num_inference_steps), cfg.guidance_scale, resolution)
    progress = ImageProgress(len(rows), what, say, bar)
    with decoder_on_device(models):
        pipeline = pipeline_from_models(models, model_dir, cfg.sampler, safety_checker)
        images = render_and_write(pipeline, rows, folder, batch_size, settings, progress, write)
        del pipeline
    progress.close()
    if models.device.type == "cuda":
        import torch  # here, not above: the PNG writers' processes import this module

        torch.cuda.empty_cache()
    return images
