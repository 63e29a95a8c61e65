"""`raybooth batch`: many subjects at once. Each subject is `raybooth run`'s job (jobs/run.py) in its
own folder under the output; their class images are made once per class (jobs/classes.py); Ray
schedules the subjects over the cluster's GPUs (jobs/pool.py). A subject that fails is told in one
line and in batch.json, and the others finish; the same command again skips the finished subjects
and resumes the rest from their checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raybooth.config import RunConfig
from raybooth.config.batch import BatchConfig
from raybooth.driver.cluster import connect, decide_use_gpu
from raybooth.driver.plan import check_inputs
from raybooth.errors import RayboothError
from raybooth.files.lock import output_lock
from raybooth.jobs.classes import make_class_images
from raybooth.jobs.pool import Progress, Slots, check_plans, run_subjects
from raybooth.jobs.run import RunPlan, plan_run
from raybooth.jobs.sheet import BATCH_FILE, SHEET_FILE, draw_sheet, table, write_batch_json
from raybooth.jobs.subject import finished
from raybooth.terminal.log import log
from raybooth.terminal.raylog import send_ray_output


@dataclass
class SubjectSettings:
    """A subject as the command read it: its name, `run`'s settings, the training settings given."""

    name: str
    run: RunConfig
    training: dict[str, Any]


def run_batch(cfg: BatchConfig, subjects: list[SubjectSettings], noun: str = "subject",
              results_file: str = BATCH_FILE) -> dict[str, dict]:
    """Train every subject not finished yet; returns {name: result} for all of them, as written to
    `results_file` (batch.json) in the output folder."""
    cfg.validate()
    output = Path(cfg.output_dir).expanduser().absolute()
    output.mkdir(parents=True, exist_ok=True)
    with output_lock(output):
        return run_locked(cfg, subjects, output, noun, results_file)


def run_locked(cfg: BatchConfig, subjects: list[SubjectSettings], output: Path, noun: str,
               results_file: str) -> dict[str, dict]:
    started = time.monotonic()
    results: dict[str, dict] = {}
    plans: dict[str, RunPlan] = {}
    for subject in subjects:
        work_dir = output / subject.name
        if earlier := finished(work_dir):
            log(f"{noun} {subject.name}: finished in an earlier run, kept")
            results[subject.name] = earlier
            continue
        try:  # each subject's inputs checked before any is trained: bad photos cost seconds
            plan = plan_run(replace(subject.run, work_dir=work_dir, overwrite=True), subject.training, local_mode=True)
            check_inputs(replace(plan.train))
        except RayboothError as error:
            results[subject.name] = {"status": "failed", "error": str(error)}
            log(f"{noun} {subject.name}: failed: {error}")
            continue
        plans[subject.name] = plan
    check_plans(plans)
    about = {"output_dir": str(output), "noun": noun}
    slots = start(cfg, plans, output, results, noun) if plans else None
    progress = Progress(len(plans), noun)

    def done(name: str, result: dict) -> None:
        results[name] = result
        progress.ended(name, result)
        write_batch_json(output / results_file, ordered(results, subjects), about)

    try:
        if slots:
            run_subjects(plans, slots, done, progress.started)
    finally:  # what is known so far, also after Ctrl-C
        for name in plans:
            results.setdefault(name, {"status": "interrupted"})
        results = ordered(results, subjects)
        write_batch_json(output / results_file, results, about)
    draw_sheet(output / SHEET_FILE, {subject.name: (Path(subject.run.instance_images_dir or
                                                         output / subject.name / "images-own"),
                                                    output / subject.name / "images-new") for subject in subjects})
    log(f"{noun}s: {output / results_file}, contact sheet: {output / SHEET_FILE}\n{table(results)}")
    failed = [name for name, result in results.items() if result["status"] != "done"]
    log(f"{len(results) - len(failed)} of {len(results)} {noun}(s) done in {time.monotonic() - started:.0f} s" +
        (f"; not done: {', '.join(failed)}" if failed else ""))
    return results


def start(cfg: BatchConfig, plans: dict[str, RunPlan], output: Path, results: dict[str, dict], noun: str) -> Slots:
    """Ray up, the class images made (their subjects dropped from `plans` where they could not be),
    and the slots the subjects train in."""
    send_ray_output(output / "ray.log", cfg.verbose)
    connect(cfg.address, cfg.verbose)
    use_gpu = decide_use_gpu(cfg.use_gpu)
    store = Path(cfg.class_images_store or output / "class-images").expanduser().absolute()
    # A subject given a class_images_dir of its own keeps it (its training makes what is missing there).
    stored = {name: plan.train for name, plan in plans.items()
              if Path(plan.train.class_images_dir) == plan.work_dir / "images-reg"}
    for name, error in make_class_images(stored, store, use_gpu, cfg.address, cfg.verbose).items():
        results[name] = {"status": "failed", "error": error}
        log(f"{noun} {name}: failed: {error}")
        del plans[name]
    for plan in plans.values():
        plan.train.use_gpu = use_gpu
    slots = Slots.on_cluster(use_gpu, cfg.subjects_per_gpu, cfg.subjects_at_once)
    if plans:
        log(f"training {len(plans)} {noun}(s) on {'GPU' if use_gpu else 'CPU'}, {min(slots.count, len(plans))} at "
            f"once; each one's own lines go to its log.txt")
    return slots


def ordered(results: dict[str, dict], subjects: list[SubjectSettings]) -> dict[str, dict]:
    return {subject.name: results[subject.name] for subject in subjects if subject.name in results}
