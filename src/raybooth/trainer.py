"""Fine-tuning, driver side: check every input before Ray starts, top up the class images,
build the Ray Data pipeline, run `train_worker` on a TorchTrainer, and turn rank 0's
checkpoint into the output pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from raybooth.cluster import check_fits, connect, cpus_per_train_worker, decide_use_gpu
from raybooth.config import GenerateConfig, TrainConfig
from raybooth.data import build_train_dataset, tokenize
from raybooth.errors import RayboothError
from raybooth.generate import generate, image_name
from raybooth.images import find_images, image_files
from raybooth.log import log
from raybooth.models import (assemble_pipeline, check_output_dir, load_tokenizer, resolve_model_dir,
                             resolve_resolution)
from raybooth.prompts import check_prompts
from raybooth.worker import TRAINING_LOG, train_worker


def train(cfg: TrainConfig) -> Path:
    """Fine-tune `cfg.model_dir` on the subject; returns the output pipeline folder."""
    # Every check that needs no Ray comes first, so bad input costs seconds, not GPU time.
    cfg.validate()
    model_dir = resolve_model_dir(cfg.model_dir)
    resolution = resolve_resolution(model_dir, cfg.resolution)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    check_prompts(cfg.instance_prompt, cfg.class_prompt, cfg.class_noun)
    instance_paths = find_images(cfg.instance_images_dir, "instance images")
    find_images(cfg.class_images_dir, "class images", may_be_empty=True)  # may be filled below
    pairs = max(len(instance_paths), cfg.num_class_images)
    if pairs < cfg.num_workers:
        raise RayboothError(f"{pairs} instance/class pairs cannot feed {cfg.num_workers} workers")

    connect(cfg.address)
    use_gpu = decide_use_gpu(cfg.use_gpu)
    if cfg.gpus_per_worker == 2 and not use_gpu:
        raise RayboothError("--gpus_per_worker 2 needs GPUs, and the Ray cluster has none")
    gpus_per_worker = cfg.gpus_per_worker if use_gpu else 0
    if use_gpu:
        check_fits(f"{cfg.num_workers} training worker(s) with {gpus_per_worker} GPU(s) each",
                   cfg.num_workers * gpus_per_worker, "GPU")
    class_paths = top_up_class_images(cfg, model_dir, resolution, use_gpu)

    tokenizer = load_tokenizer(model_dir)
    dataset = build_train_dataset(instance_paths, class_paths, tokenize(tokenizer, cfg.instance_prompt),
                                  tokenize(tokenizer, cfg.class_prompt), resolution)
    log(f"fine-tuning {model_dir} on {len(instance_paths)} instance and {len(class_paths)} class images "
        f"at {resolution} px, {cfg.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}")
    result = fit(cfg, model_dir, pairs, dataset, use_gpu, gpus_per_worker)
    with result.checkpoint.as_directory() as trained:
        output_dir = assemble_pipeline(model_dir, Path(trained), cfg.output_dir, cfg.overwrite)
    # The output now holds these weights; a second copy in storage would only fill the disk.
    result.checkpoint.filesystem.delete_dir(result.checkpoint.path)
    history = json.loads((output_dir / TRAINING_LOG).read_text())["history"]
    if history:
        window = max(1, min(10, len(history) // 2))
        first, last = (sum(row["loss"] for row in rows) / len(rows) for rows in (history[:window], history[-window:]))
        log(f"{len(history)} steps; mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
    log(f"wrote the fine-tuned pipeline to {output_dir}")
    return output_dir


def top_up_class_images(cfg: TrainConfig, model_dir: Path, resolution: int, use_gpu: bool) -> list[Path]:
    """The class images to train with: those in the folder, after generating as many as it lacks
    of `num_class_images` with the pretrained model (images of its own stay and count)."""
    ours = {image_name(cfg.class_prompt, i) for i in range(cfg.num_class_images)}
    others = [p for p in image_files(cfg.class_images_dir) if p.name not in ours]
    missing = cfg.num_class_images - len(others)
    if missing > 0:
        generate(GenerateConfig(
            model_dir=model_dir, output_dir=cfg.class_images_dir, prompts=[cfg.class_prompt],
            num_samples_per_prompt=missing, batch_size=cfg.sample_batch_size,
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, resolution=resolution,
            seed=cfg.seed, use_gpu=use_gpu, address=cfg.address))
    return find_images(cfg.class_images_dir, "class images")[:cfg.num_class_images]


def fit(cfg: TrainConfig, model_dir: Path, pairs: int, dataset, use_gpu: bool, gpus_per_worker: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_train_worker(cfg.num_workers)}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "model_dir": model_dir, "pairs": pairs},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"raybooth-{time.strftime('%Y%m%d-%H%M%S')}",
                                       storage_path=cfg.storage_path),
        datasets={"train": dataset})
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise RayboothError(f"training failed on a worker: {lines[-1] if lines else error!r} "
                            "(its traceback is printed above)") from None
