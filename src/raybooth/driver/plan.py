"""Everything `raybooth train` decides before any worker starts, checked before Ray starts so
bad input costs seconds: the inputs (model folder, resolution, photos, prompts), which class
images exist and which the workers are to make, the GPUs each worker gets, and the TrainPlan that
the launch and every worker read."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from raybooth.config import TrainConfig
from raybooth.driver.cluster import check_fits, decide_use_gpu, node_count, started_here
from raybooth.driver.runs import RunFolder
from raybooth.errors import RayboothError
from raybooth.files.captions import captions_line, read_captions
from raybooth.files.checkpoints import fingerprint
from raybooth.files.images import find_images, image_files, upright_size
from raybooth.files.names import generated_for, image_name, image_seed, prompt_digest
from raybooth.generate.sample_plans import WorkerSamples, share_out
from raybooth.models.folders import check_vae_dir, resolve_model_dir, resolve_resolution
from raybooth.models.output import check_output_dir
from raybooth.models.prompts import check_captions, check_prompt_lengths, check_prompts, words
from raybooth.terminal.log import log
from raybooth.terminal.progress import terminal_shows_bars
from raybooth.train.plan import TrainPlan
from raybooth.train.preload import local_devices


def uses_local_mode(cfg: TrainConfig, started_here: bool) -> bool:
    """As --local_mode says, else wherever nothing needs a worker process and this command
    started the Ray it uses (on a cluster the command's own machine may have no GPU)."""
    if cfg.local_mode is not None:
        return cfg.local_mode
    return started_here and cfg.local_mode_blocker() is None


@dataclass
class Inputs:
    """What `check_inputs` found: the model folder, the resolution to train at, the subject's
    photos, the settings a checkpoint to resume from must match, and the photos' own prompts."""

    model_dir: Path
    resolution: int
    instance_paths: list[Path]
    settings: dict
    captions: dict[str, str] = field(default_factory=dict)  # {photo: its caption}, for those that have one


def check_inputs(cfg: TrainConfig) -> Inputs:
    """Every check that needs no Ray."""
    cfg.validate()
    model_dir = resolve_model_dir(cfg.model_dir)
    if cfg.pretrained_vae_model_name_or_path is not None:  # absolute: workers run in folders of their own
        cfg.pretrained_vae_model_name_or_path = check_vae_dir(cfg.pretrained_vae_model_name_or_path)
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
        from raybooth.train.optim import check_8bit_adam

        check_8bit_adam(on_gpu=cfg.use_gpu is not False)
    instance_paths = find_images(cfg.instance_images_dir, "instance images", resolution=resolution)
    captions = read_captions(cfg.instance_images_dir, instance_paths, cfg.caption_column)
    check_captions(model_dir, captions, identifier, noun, cfg.tokenizer_max_length)
    if line := captions_line(captions, len(instance_paths), cfg.caption_column):
        log(line)
    find_images(cfg.class_images_dir, "class images", may_be_empty=True, resolution=resolution)  # missing: made later
    if cfg.num_class_images < cfg.num_workers:
        raise RayboothError(f"--num_class_images {cfg.num_class_images} cannot feed {cfg.num_workers} workers: "
                            "each needs at least one class image")
    return Inputs(model_dir, resolution, instance_paths, fingerprint(cfg, resolution), captions)


def worker_gpus(cfg: TrainConfig) -> tuple[bool, int]:
    """(whether to train on GPUs, GPUs per worker), checked against the cluster."""
    use_gpu = decide_use_gpu(cfg.use_gpu)
    if cfg.use_8bit_adam and not use_gpu:
        from raybooth.train.optim import check_8bit_adam

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


def make_plan(cfg: TrainConfig, inputs: Inputs, class_entries: list[dict], sample_sets: list[WorkerSamples],
              partial: Path, run: RunFolder, logs_dir: Path, resume_from: str | None) -> TrainPlan:
    """The one plan the launch and every worker read, once Ray is up: the GPUs each worker gets
    (checked against the cluster), whether the one worker runs in this process, each worker's
    share of the class images and of the sample sets, and where rank 0 writes the output."""
    use_gpu, gpus_per_worker = worker_gpus(cfg)
    local = uses_local_mode(cfg, started_here())
    shares = share_out(class_entries, cfg.num_workers)
    return TrainPlan(
        config=cfg, model_dir=inputs.model_dir, resolution=inputs.resolution, class_images_dir=class_dir(cfg),
        class_shares=shares, output_partial=str(partial), output_token=uuid.uuid4().hex,
        # Every worker takes as many steps: as many pairs as the larger of its photos (each counted
        # --repeats times, as diffusers' dataset repeats them) and its class images.
        pairs_per_worker=max(math.ceil(len(inputs.instance_paths) * cfg.repeats / cfg.num_workers),
                             max(map(len, shares))),
        sample_sets=sample_sets, settings=inputs.settings, resume_from=resume_from, logs_dir=logs_dir,
        progress_bars=terminal_shows_bars(),
        local_devices=local_devices(use_gpu, gpus_per_worker) if local else None,
        local_run_dir=run.local_path if local else None, use_gpu=use_gpu, gpus_per_worker=gpus_per_worker,
        instance_paths=[str(path) for path in inputs.instance_paths], instance_captions=inputs.captions,
        instance_sizes={str(path): upright_size(path) for path in inputs.instance_paths})


def step_cap(plan: TrainPlan) -> str | None:
    """The line that says why a run takes fewer steps than --max_train_steps: --num_epochs ends it
    first (both bound it, as in the original DreamBooth scripts), which a user who asked for 400
    steps and got 16 would not guess."""
    cfg, steps = plan.config, plan.total_steps()
    if steps >= cfg.max_train_steps:
        return None
    per_epoch = steps // cfg.num_epochs  # whole: fewer steps than the most means every epoch ran
    return (f"{steps} steps, not --max_train_steps {cfg.max_train_steps}: --num_epochs {cfg.num_epochs} passes over "
            f"{plan.pairs_per_worker} pairs per worker end first; --num_epochs "
            f"{math.ceil(cfg.max_train_steps / per_epoch)} would take all {cfg.max_train_steps}")
