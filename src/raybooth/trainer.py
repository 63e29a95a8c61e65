"""Fine-tuning, driver side: check every input before Ray starts, top up the class images,
build the Ray Data pipeline, run `train_worker` on a TorchTrainer, and turn rank 0's
checkpoint into the output pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from raybooth.cluster import check_fits, connect, cpus_per_worker, decide_use_gpu, node_count
from raybooth.config import GenerateConfig, TrainConfig
from raybooth.data import build_train_dataset, tokenize
from raybooth.errors import RayboothError
from raybooth.generate import generate, generated_for, prompt_digest
from raybooth.images import find_images, image_files
from raybooth.log import log
from raybooth.models import (TRAINING_LOG, assemble_pipeline, check_output_dir, load_tokenizer,
                             resolve_model_dir, resolve_resolution)
from raybooth.prompts import check_prompts
from raybooth.worker import train_worker


def train(cfg: TrainConfig) -> Path:
    """Fine-tune `cfg.model_dir` on the subject; returns the output pipeline folder."""
    model_dir, resolution, instance_paths = check_inputs(cfg)  # before Ray: bad input costs seconds
    connect(cfg.address)
    use_gpu, gpus_per_worker = worker_gpus(cfg)
    class_paths = top_up_class_images(cfg, model_dir, resolution, use_gpu)

    tokenizer = load_tokenizer(model_dir)
    dataset = build_train_dataset(instance_paths, class_paths, tokenize(tokenizer, cfg.instance_prompt),
                                  tokenize(tokenizer, cfg.class_prompt), resolution)
    log(f"fine-tuning {model_dir} on {len(instance_paths)} instance and {len(class_paths)} class images "
        f"at {resolution} px, {cfg.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}")
    pairs = max(len(instance_paths), len(class_paths))
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


def check_inputs(cfg: TrainConfig) -> tuple[Path, int, list[Path]]:
    """Every check that needs no Ray: (model folder, resolution, instance images)."""
    cfg.validate()
    model_dir = resolve_model_dir(cfg.model_dir)
    resolution = resolve_resolution(model_dir, cfg.resolution)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    check_prompts(cfg.instance_prompt, cfg.class_prompt, cfg.class_noun)
    instance_paths = find_images(cfg.instance_images_dir, "instance images")
    find_images(cfg.class_images_dir, "class images", may_be_empty=True)  # missing ones are made later
    pairs = max(len(instance_paths), cfg.num_class_images)
    if pairs < cfg.num_workers:
        raise RayboothError(f"{pairs} instance/class pairs cannot feed {cfg.num_workers} workers")
    return model_dir, resolution, instance_paths


def worker_gpus(cfg: TrainConfig) -> tuple[bool, int]:
    """(whether to train on GPUs, GPUs per worker), checked against the cluster."""
    use_gpu = decide_use_gpu(cfg.use_gpu)
    if cfg.gpus_per_worker == 2 and not use_gpu:
        raise RayboothError("--gpus_per_worker 2 needs GPUs, and the Ray cluster has none")
    if use_gpu:
        check_fits(f"{cfg.num_workers} training worker(s) with {cfg.gpus_per_worker} GPU(s) each",
                   cfg.num_workers * cfg.gpus_per_worker, "GPU")
    if node_count() > 1 and cfg.storage_path is None:
        log("warning: on several nodes, pass --storage_path on storage they all share, or the driver may not "
            "find the weights that rank 0 saves")
    return use_gpu, cfg.gpus_per_worker if use_gpu else 0


def top_up_class_images(cfg: TrainConfig, model_dir: Path, resolution: int, use_gpu: bool) -> list[Path]:
    """The `num_class_images` class images to train with: the user's own first, then ones the
    pretrained model generates for the class prompt (made now if missing). Images generated
    for another class prompt, as after a change of class, are left out."""
    made_for = {path: generated_for(path.name) for path in image_files(cfg.class_images_dir)}
    own = [path for path, digest in made_for.items() if digest is None][:cfg.num_class_images]
    foreign = [path for path, digest in made_for.items() if digest not in (None, prompt_digest(cfg.class_prompt))]
    if foreign:
        log(f"leaving out {len(foreign)} images in {cfg.class_images_dir} generated for another class prompt")
    missing = cfg.num_class_images - len(own)
    if missing <= 0:
        return own
    # No safety checker: the black images it returns for flagged samples would teach the prior.
    return own + generate(GenerateConfig(
        model_dir=model_dir, output_dir=cfg.class_images_dir, prompts=[cfg.class_prompt],
        num_samples_per_prompt=missing, batch_size=cfg.sample_batch_size, num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, resolution=resolution, seed=cfg.seed, safety_checker=False,
        use_gpu=use_gpu, address=cfg.address))


def fit(cfg: TrainConfig, model_dir: Path, pairs: int, dataset, use_gpu: bool, gpus_per_worker: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker(cfg.num_workers, use_gpu)}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "model_dir": model_dir, "pairs": pairs},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"raybooth-{time.strftime('%Y%m%d-%H%M%S')}",
                                       storage_path=absolute_storage_path(cfg.storage_path)),
        datasets={"train": dataset})
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise RayboothError(f"training failed on a worker: {lines[-1] if lines else error!r} "
                            "(its traceback is printed above)") from None


def absolute_storage_path(storage_path: str | None) -> str | None:
    """A local folder made absolute (workers resolve relative paths elsewhere); URIs as given."""
    if storage_path is None or "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().absolute())
