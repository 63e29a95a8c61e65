"""Fine-tuning, driver side: check every input before Ray starts, plan which class images each
worker reads or makes, hand the images to Ray Data and the loop to a TorchTrainer, and swap the
finished pipeline into place. The output folder is prepared before training (the base model's
untrained parts copied in), so that rank 0 writes the trained weights straight into it."""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path

from raybooth.checkpoint_folders import fingerprint
from raybooth.cluster import check_fits, cluster_resource, connect, decide_use_gpu, node_count, started_here
from raybooth.config import TrainConfig
from raybooth.data import image_dataset
from raybooth.errors import RayboothError
from raybooth.generate import generated_for, image_name, image_seed, prompt_digest
from raybooth.images import find_images, image_files
from raybooth.launch import fit, local_devices, preload
from raybooth.log import log
from raybooth.models import (TRAINING_LOG, check_output_dir, copy_base_components, copy_trained, finish_model_dir,
                             resolve_model_dir, resolve_resolution, start_model_dir)
from raybooth.prompts import check_prompt_lengths, check_prompts, words
from raybooth.runs import RunFolder
from raybooth.sampling import SampleSet, plan_sample_set, share_out
from raybooth.watch.folders import RunLogs
from raybooth.watch.progress import terminal_shows_bars
from raybooth.watch.raylog import send_ray_output
from raybooth.watch.report import report_run


def train(cfg: TrainConfig, extra_samples: tuple[SampleSet, ...] = ()) -> Path:
    """Fine-tune `cfg.model_dir` on the subject; returns the output pipeline folder. The workers
    also make `cfg.sample_prompts`' samples after training, and `extra_samples`."""
    started = time.time()
    model_dir, resolution, instance_paths = check_inputs(cfg)  # before Ray: bad input costs seconds
    settings = fingerprint(cfg, resolution)
    run = RunFolder(cfg)
    resume_from = run.plan_resume(cfg.resume_from_checkpoint, settings)
    partial = start_output(cfg)
    class_dir_is_new = not class_dir(cfg).exists()
    try:
        class_entries = plan_class_images(cfg)
        # Local mode: the models load and the images are read while Ray starts.
        preloaded = preload(cfg, model_dir, instance_paths, [entry["path"] for entry in class_entries
                                                             if "path" in entry], resolution)
        logs = RunLogs.for_run(cfg, started, run.local_path, run.name)
        send_ray_output(logs.ray_log, cfg.verbose)
        connect(cfg.address, cfg.verbose)
        from raybooth.worker import OUTPUT_TOKEN, TrainPlan  # torch and Ray Train (3 s): bad input fails before
        logs.announce(cfg)
        use_gpu, gpus_per_worker = worker_gpus(cfg)
        local = cfg.uses_local_mode(started_here())
        main_samples = (SampleSet(cfg.samples_dir, cfg.sample_prompts, cfg.num_samples_per_prompt, cfg.seed)
                        if cfg.sample_prompts else None)
        sample_sets = [plan_sample_set(samples, cfg.num_workers)
                       for samples in ([main_samples] if main_samples else []) + list(extra_samples)]
        if not cfg.use_lora:  # a LoRA output holds the adapter alone, no pipeline
            copy_base_components(model_dir, partial,
                                 skip=("unet", "text_encoder") if cfg.train_text_encoder else ("unet",))
        token = uuid.uuid4().hex
        (partial / OUTPUT_TOKEN).write_text(token)
        shares = share_out(class_entries, cfg.num_workers)
        plan = TrainPlan(
            model_dir=model_dir, resolution=resolution, class_images_dir=class_dir(cfg), class_shares=shares,
            output_partial=str(partial), output_token=token,
            pairs_per_worker=max(math.ceil(len(instance_paths) / cfg.num_workers), max(map(len, shares))),
            sample_sets=sample_sets, settings=settings,
            resume_from=resume_from, logs_dir=logs.run, progress_bars=terminal_shows_bars(),
            local_devices=local_devices(use_gpu, gpus_per_worker) if local else None,
            local_run_dir=run.local_path if local else None)
        to_make = sum("file" in entry for entry in class_entries)
        log(f"fine-tuning {model_dir} on {len(instance_paths)} instance and {len(class_entries)} class images "
            f"({to_make} to generate first) at {resolution} px, {cfg.num_workers} worker(s) on "
            f"{'GPU' if use_gpu else 'CPU'}{' in this process (Ray Train local mode)' if local else ''}")
        images = {} if local and preloaded else datasets(instance_paths, shares, resolution)  # read already
        result = fit(cfg, plan, images, use_gpu, gpus_per_worker, run, preloaded)
        log("workers finished")
        if not (partial / TRAINING_LOG).exists():
            log("rank 0 could not see the output folder; taking the weights from its Ray Train checkpoint")
            with result.checkpoint.as_directory() as trained:
                copy_trained(Path(trained), partial)
        (partial / OUTPUT_TOKEN).unlink()
        report_run(cfg, logs, partial, instance_paths, main_samples.paths() if main_samples else [], started)
        output_dir = finish_model_dir(partial, cfg.output_dir)
        run.remove(result)  # nothing in the run folder is needed now
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):  # stop the workers before their run folder goes
            import ray

            ray.shutdown()
        run.after_failure(interrupted=isinstance(error, KeyboardInterrupt))
        if class_dir_is_new and class_dir(cfg).is_dir() and not any(class_dir(cfg).iterdir()):
            class_dir(cfg).rmdir()  # made for this run, and nothing was put in it
        raise
    summarize(json.loads((output_dir / TRAINING_LOG).read_text())["history"])
    if cfg.use_lora:
        log(f"wrote the LoRA adapter to {output_dir}; apply it to {model_dir} with `raybooth generate --model_dir "
            f"{model_dir} --lora_weights_dir {output_dir}` (or `raybooth merge-lora` for a full pipeline)")
    else:
        log(f"wrote the fine-tuned pipeline to {output_dir}")
    return output_dir


def start_output(cfg: TrainConfig) -> Path:
    """The output's partial folder, made now: an output that cannot be written is found out before
    training, not after."""
    try:
        return start_model_dir(cfg.output_dir, cfg.overwrite)
    except OSError as error:
        raise RayboothError(f"--output_dir {cfg.output_dir} cannot be written: {error.strerror or error}") from None


def check_inputs(cfg: TrainConfig) -> tuple[Path, int, list[Path]]:
    """Every check that needs no Ray: (model folder, resolution, instance images)."""
    cfg.validate()
    model_dir = resolve_model_dir(cfg.model_dir)
    resolution = resolve_resolution(model_dir, cfg.resolution)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    noun = words(check_prompts(cfg.instance_prompt, cfg.class_prompt, cfg.class_noun))
    identifier = sorted(set(words(cfg.instance_prompt)) - set(words(cfg.class_prompt)))
    check_prompt_lengths(model_dir, {"--instance_prompt": cfg.instance_prompt, "--class_prompt": cfg.class_prompt,
                                     **{f"--sample_prompts {i}": p for i, p in enumerate(cfg.sample_prompts or [], 1)}},
                         {"--instance_prompt": identifier + noun, "--class_prompt": noun})
    if cfg.tokenizer_max_length is not None:  # the training prompts' own cut
        check_prompt_lengths(model_dir, {"--instance_prompt": cfg.instance_prompt, "--class_prompt": cfg.class_prompt},
                             {"--instance_prompt": identifier + noun, "--class_prompt": noun}, cfg.tokenizer_max_length)
    if cfg.use_8bit_adam:
        from raybooth.optim import check_8bit_adam

        check_8bit_adam(on_gpu=cfg.use_gpu is not False)
    instance_paths = find_images(cfg.instance_images_dir, "instance images", resolution=resolution)
    find_images(cfg.class_images_dir, "class images", may_be_empty=True, resolution=resolution)  # missing: made later
    if cfg.num_class_images < cfg.num_workers:
        raise RayboothError(f"--num_class_images {cfg.num_class_images} cannot feed {cfg.num_workers} workers: "
                            "each needs at least one class image")
    return model_dir, resolution, instance_paths


def worker_gpus(cfg: TrainConfig) -> tuple[bool, int]:
    """(whether to train on GPUs, GPUs per worker), checked against the cluster."""
    use_gpu = decide_use_gpu(cfg.use_gpu)
    if cfg.use_8bit_adam and not use_gpu:
        from raybooth.optim import check_8bit_adam

        check_8bit_adam(on_gpu=False)  # a cluster without GPUs
    if cfg.gpus_per_worker == 2 and not use_gpu:
        raise RayboothError("--gpus_per_worker 2 needs GPUs, and the Ray cluster has none")
    if use_gpu:
        check_fits(f"{cfg.num_workers} training worker(s) with {cfg.gpus_per_worker} GPU(s) each",
                   cfg.num_workers * cfg.gpus_per_worker, "GPU")
    if node_count() > 1 and cfg.storage_path is None:
        log("warning: on several nodes, pass --storage_path on storage they all share, or the driver may not "
            "find the weights that rank 0 saves")
    return use_gpu, cfg.gpus_per_worker if use_gpu else 0


def class_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.class_images_dir).expanduser().absolute()  # workers run in a folder of their own


def plan_class_images(cfg: TrainConfig) -> list[dict]:
    """The `num_class_images` class images to train with: the user's own first, then ones the
    pretrained model generates for the class prompt ({"path"} where made already, {"prompt",
    "seed", "file"} where the workers are to make them). Images generated for another class
    prompt, as after a change of class, are left out."""
    folder = class_dir(cfg)
    made_for = {path: generated_for(path.name) for path in image_files(folder)}
    own = [path for path, digest in made_for.items() if digest is None][:cfg.num_class_images]
    foreign = [path for path, digest in made_for.items() if digest not in (None, prompt_digest(cfg.class_prompt))]
    if foreign:
        log(f"leaving out {len(foreign)} images in {folder} generated for another class prompt")
    entries = [{"path": str(path)} for path in own]
    for index in range(cfg.num_class_images - len(own)):
        path = folder / image_name(cfg.class_prompt, index)
        entries.append({"path": str(path)} if path.exists() else
                       {"prompt": cfg.class_prompt, "seed": image_seed(cfg.seed, cfg.class_prompt, index), "file": path.name})
    if any("file" in entry for entry in entries):
        folder.mkdir(parents=True, exist_ok=True)
    return entries


def datasets(instance_paths: list[Path], shares: list[list[dict]], resolution: int) -> dict:
    """Ray Data reads the images: all instance images for every worker, and each worker's own
    class images as a dataset of its own ("class_RANK"), so none is read twice or dropped."""
    parallelism = max(1, int(cluster_resource("CPU")) - len(shares))
    out = {"instance": image_dataset(instance_paths, resolution, parallelism)}
    for rank, share in enumerate(shares):
        paths = [Path(entry["path"]) for entry in share if "path" in entry]
        if paths:
            out[f"class_{rank}"] = image_dataset(paths, resolution, max(1, parallelism // len(shares)))
    return out


def summarize(history: list[dict]) -> None:
    if history:
        window = max(1, min(10, len(history) // 2))
        first, last = (sum(row["loss"] for row in rows) / len(rows) for rows in (history[:window], history[-window:]))
        log(f"{len(history)} steps; mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
