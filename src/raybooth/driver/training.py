"""`raybooth train`, driver side: build the plan (plan.py), hand the images to Ray Data and the
loop to a TorchTrainer (launch.py), and swap the finished pipeline into place. The output folder
is prepared before training (the base model's untrained parts copied in), so that rank 0 writes
the trained weights straight into it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from raybooth.config import TrainConfig
from raybooth.driver.cluster import connect
from raybooth.driver.datasets import datasets
from raybooth.driver.launch import finish_writes, fit
from raybooth.driver.plan import Inputs, check_inputs, class_dir, make_plan, plan_class_images, step_cap
from raybooth.driver.preload import preload
from raybooth.driver.runs import RunFolder
from raybooth.errors import RayboothError
from raybooth.files.lock import output_lock
from raybooth.generate.sample_plans import SampleSet, plan_sample_set
from raybooth.models.export import write_extra_formats
from raybooth.models.folders import model_family
from raybooth.models.output import TRAINING_LOG, copy_base_components, copy_trained, finish_model_dir, start_model_dir
from raybooth.terminal.log import log
from raybooth.terminal.raylog import send_ray_output
from raybooth.train.plan import OUTPUT_TOKEN, TrainPlan
from raybooth.train.preload import Preloaded
from raybooth.watch.folders import RunLogs
from raybooth.watch.report import report_run


def train(cfg: TrainConfig, extra_samples: tuple[SampleSet, ...] = ()) -> Path:
    """Fine-tune `cfg.model_dir` on the subject; returns the output pipeline folder. The workers
    also make `cfg.sample_prompts`' samples after training, and `extra_samples`."""
    started = time.time()
    inputs = check_inputs(cfg)  # before Ray: bad input costs seconds
    with output_lock(cfg.output_dir):  # before anything is written: one run per output at a time
        output_dir = train_locked(cfg, inputs, extra_samples, started)
    summarize(json.loads((output_dir / TRAINING_LOG).read_text())["history"])
    if cfg.use_lora:
        log(f"wrote the LoRA adapter to {output_dir}; apply it to {inputs.model_dir} with `raybooth generate "
            f"--model_dir {inputs.model_dir} --lora_weights_dir {output_dir}` (or `raybooth merge-lora` for a full "
            "pipeline)")
    else:
        log(f"wrote the fine-tuned pipeline to {output_dir}")
    return output_dir


def train_locked(cfg: TrainConfig, inputs: Inputs, extra_samples: tuple[SampleSet, ...], started: float) -> Path:
    """`train` once the output is ours: train into the partial folder, then place it."""
    run = RunFolder(cfg)
    resume_from = run.plan_resume(cfg.resume_from_checkpoint, inputs.settings)
    partial = start_output(cfg)
    class_dir_is_new = not class_dir(cfg).exists()
    try:
        class_entries = plan_class_images(cfg)
        # Local mode: the models load and the images are read while Ray starts.
        preloaded = preload(cfg, inputs.model_dir, inputs.instance_paths,
                            [entry["path"] for entry in class_entries if "path" in entry], inputs.resolution)
        logs = RunLogs.for_run(cfg, started, run.local_path, run.name)
        send_ray_output(logs.ray_log, cfg.verbose)
        connect(cfg.address, cfg.verbose)
        logs.announce(cfg)
        main_samples = (SampleSet(cfg.samples_dir, cfg.sample_prompts, cfg.num_samples_per_prompt, cfg.seed)
                        if cfg.sample_prompts else None)
        sample_sets = [plan_sample_set(samples, cfg.num_workers)
                       for samples in ([main_samples] if main_samples else []) + list(extra_samples)]
        plan = make_plan(cfg, inputs, class_entries, sample_sets, partial, run, logs.run, resume_from)
        result = launch(plan, preloaded, run, class_entries)
        if not (partial / TRAINING_LOG).exists():
            log("rank 0 could not see the output folder; taking the weights from its Ray Train checkpoint")
            with result.checkpoint.as_directory() as trained:
                copy_trained(Path(trained), partial)
        (partial / OUTPUT_TOKEN).unlink()
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):  # stop the workers before their run folder goes
            import ray

            ray.shutdown()
        finish_writes()  # a checkpoint still being written is whole before the run folder is judged
        run.after_failure(interrupted=isinstance(error, KeyboardInterrupt))
        if class_dir_is_new and class_dir(cfg).is_dir() and not any(class_dir(cfg).iterdir()):
            class_dir(cfg).rmdir()  # made for this run, and nothing was put in it
        raise
    # The partial folder holds the trained weights now: whatever fails from here on keeps it, and
    # Ray Train's run folder with the logs that may not have moved yet.
    try:
        write_extra_formats(partial, Path(cfg.output_dir), cfg.save_single_file, cfg.output_kohya_format)
        report_run(cfg, logs, partial, inputs.instance_paths, main_samples.paths() if main_samples else [], started)
        output_dir = finish_model_dir(partial, cfg.output_dir)
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        what = "was interrupted" if interrupted else f"failed ({type(error).__name__}: {error})"
        kept = (f"training finished, but placing the output {what}; the trained model is kept in {partial}: move it "
                f"to {Path(cfg.output_dir).expanduser().absolute()} yourself, or train again")
        if interrupted:
            log(kept)
            raise
        raise RayboothError(kept) from error
    run.remove(result)  # nothing in the run folder is needed now
    return output_dir


def launch(plan: TrainPlan, preloaded: Preloaded | None, run: RunFolder, class_entries: list[dict]):
    """The output's partial folder readied for rank 0 (the base model's untrained parts, and the
    token by which rank 0 knows it sees this folder), the images handed to Ray Data, then the
    loop to Ray Train; the result once the workers finish."""
    cfg, partial = plan.config, Path(plan.output_partial)
    if not cfg.use_lora:  # a LoRA output holds the adapter alone, no pipeline
        trained_encoders = model_family(plan.model_dir).text_encoder_names if cfg.train_text_encoder else ()
        own_vae = cfg.pretrained_vae_model_name_or_path
        copy_base_components(plan.model_dir, partial, skip=("unet", *trained_encoders, *(("vae",) if own_vae else ())))
        if own_vae:  # the VAE it trained and sampled with
            shutil.copytree(own_vae, partial / "vae")
    (partial / OUTPUT_TOKEN).write_text(plan.output_token)
    to_make = sum("file" in entry for entry in class_entries)
    log(f"fine-tuning {plan.model_dir} on {len(plan.instance_paths)} instance and {len(class_entries)} class images "
        f"({to_make} to generate first) at {plan.resolution} px, {cfg.num_workers} worker(s) on "
        f"{'GPU' if plan.use_gpu else 'CPU'}{' in this process (Ray Train local mode)' if plan.local else ''}")
    cap = step_cap(plan)
    if cap:
        log(cap)
    images = ({} if plan.local and preloaded  # read already
              else datasets([Path(path) for path in plan.instance_paths], plan.class_shares, plan.resolution,
                             cfg.image_interpolation_mode))
    result = fit(plan, images, run, preloaded)
    log("workers finished")
    return result


def start_output(cfg: TrainConfig) -> Path:
    """The output's partial folder, made now: an output that cannot be written is found out before
    training, not after. Partial folders that a killed run left beside the output go first (with
    the lock held no other run writes there), except one that holds finished weights."""
    output = Path(cfg.output_dir).expanduser().absolute()
    for stale in sorted(output.parent.glob(f".{output.name}.partial-*")) if output.parent.is_dir() else []:
        if (stale / TRAINING_LOG).exists():
            log(f"an earlier run's finished model is still in {stale} (it could not be placed): move it out, or "
                "delete it")
            continue
        log(f"removing {stale}, left half-written by an earlier run that was killed")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        return start_model_dir(cfg.output_dir, cfg.overwrite)
    except OSError as error:
        raise RayboothError(f"--output_dir {cfg.output_dir} cannot be written: {error.strerror or error}") from None


def summarize(history: list[dict]) -> None:
    if history:
        window = max(1, min(10, len(history) // 2))
        first, last = (sum(row["loss"] for row in rows) / len(rows) for rows in (history[:window], history[-window:]))
        log(f"{len(history)} steps; mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
