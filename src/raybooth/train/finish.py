"""The end of a worker's run: rank 0's output (the trained modules or the LoRA adapter, and the
training log), whether rank 0 sees the output folder, and the samples each worker makes with the
model it holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from raybooth import __version__
from raybooth.config import TrainConfig
from raybooth.generate.on_worker import make_images_on_worker
from raybooth.models import lora
from raybooth.models.loading import save_trained_modules
from raybooth.models.output import TRAINING_LOG
from raybooth.train.checkpoint_writer import writing_stream
from raybooth.train.losslog import LossLog
from raybooth.train.optim import learning_rates
from raybooth.train.plan import OUTPUT_TOKEN, TrainPlan
from raybooth.train.precision import Precision


def save_output(models, folder: Path, cfg: TrainConfig, plan: TrainPlan, history: dict) -> None:
    """Rank 0's output: the trained modules (or the LoRA adapter) and the training log. Run beside
    the samples, so its copies to the host go on a stream of their own."""
    with writing_stream(models.device):
        if cfg.use_lora:
            lora.save_output(models, folder, cfg, Path(plan.model_dir), plan.resolution)
        else:
            save_trained_modules(models, folder)
    Path(folder, TRAINING_LOG).write_text(json.dumps(history, indent=1, default=str))


def training_log(cfg: TrainConfig, precision: Precision, world_size: int, models, losses: LossLog,
                 channels_last: bool) -> dict:
    """What TRAINING_LOG holds beside the weights: the run's settings and its loss history."""
    return {"raybooth_version": __version__, "mixed_precision": precision.mode, "world_size": world_size,
            "bf16_gradients": models.masters is not None,  # as the run trained, decided once at set-up
            "channels_last": channels_last,
            "learning_rate": learning_rates(cfg, world_size)[0], "config": dataclasses.asdict(cfg),
            "history": losses.history}


def make_samples(plan: TrainPlan, rank: int, models, cfg: TrainConfig, say, before_training: bool) -> bool:
    """This worker's share of the sample sets due now, from the model in memory; whether any were."""
    due = [samples for samples in plan.sample_sets if samples.before_training == before_training]
    for samples in due:
        make_images_on_worker(models, Path(plan.model_dir), samples.shares[rank], Path(samples.folder), cfg,
                              plan.resolution, samples.what, say, safety_checker=samples.safety_checker,
                              bar=plan.progress_bars and rank == 0)
    return bool(due)


def sees_output(plan: TrainPlan) -> bool:
    token = Path(plan.output_partial, OUTPUT_TOKEN)
    return token.is_file() and token.read_text() == plan.output_token
