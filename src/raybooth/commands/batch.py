"""`raybooth batch` and `raybooth sweep`: the manifest read (jobs/manifest.py; with none, the small
world's demo batch), each subject's or trial's options checked as `raybooth run`'s flags, then the
job (jobs/batch.py, jobs/sweep.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from raybooth.commands.arguments import config_from_args, run_settings_from
from raybooth.config.batch import BatchConfig
from raybooth.errors import RayboothError
from raybooth.jobs.manifest import Manifest, Subject, manifest_from, read_manifest


def manifest_of(cfg: BatchConfig) -> Manifest:
    if cfg.manifest is not None:
        return read_manifest(cfg.manifest)
    from raybooth.terminal.log import log
    from raybooth.world.demo import demo_batch

    photos = Path(cfg.output_dir).expanduser().absolute() / "photos"
    log(f"no manifest given: the demo batch, three subjects of the small world (their photos: {photos})")
    return manifest_from(demo_batch(photos), photos, "the demo batch")


def settings(subjects: list[Subject], where: str):
    from raybooth.jobs.batch import SubjectSettings

    return [SubjectSettings(subject.name, *run_settings_from(subject.options, f"{where}: {subject.name}"))
            for subject in subjects]


def batch_command(args: argparse.Namespace) -> None:
    from raybooth.jobs.batch import run_batch

    cfg = config_from_args(BatchConfig, args)
    manifest = manifest_of(cfg)
    results = run_batch(cfg, settings(manifest.subjects, manifest.where))
    if failed := [name for name, result in results.items() if result["status"] != "done"]:
        raise RayboothError(f"{len(failed)} of {len(results)} subjects did not finish: {', '.join(failed)} (the "
                            "others are done; the same command again retries these)")
    print(Path(cfg.output_dir).absolute())


def sweep_command(args: argparse.Namespace) -> None:
    from raybooth.jobs.sweep import plan_sweep, run_sweep

    cfg = config_from_args(BatchConfig, args)
    manifest = manifest_of(cfg)
    sweep, trials = plan_sweep(manifest)
    run_sweep(cfg, sweep, settings(trials, manifest.where))
    print(Path(cfg.output_dir).absolute())


BATCH = (batch_command, BatchConfig,
         "Fine-tune many subjects at once (a manifest of subjects, or the small world's demo batch), scheduled over "
         "the Ray cluster's GPUs; class images made once per class; finished subjects kept on a re-run.")
SWEEP = (sweep_command, BatchConfig,
         "Train one subject under many settings at once (the manifest's `sweep` section, a grid or random search "
         "with Ray Tune's search spaces), score each by `raybooth evaluate`'s measures, write the best as a --config.")
