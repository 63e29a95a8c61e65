"""The TrainPlan: what the driver decided (driver/plan.py), for every worker alike. The launch
and the worker's loop read it, with the checked TrainConfig it carries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from raybooth.config import TrainConfig
from raybooth.files.checkpoints import resumable_flags
from raybooth.generate.sample_plans import WorkerSamples
from raybooth.terminal.log import clock_start

OUTPUT_TOKEN = ".raybooth-output"  # in the output's partial folder: rank 0 writes there if it sees it


@dataclass
class TrainPlan:
    """What the driver decided, for every worker alike: the checked settings, and what follows
    from them and from the cluster. The launch and the worker's loop read this, nothing else."""

    config: TrainConfig  # checked (TrainConfig.validate) before the plan was made
    model_dir: Path
    resolution: int
    class_images_dir: Path
    class_shares: list[list[dict]]  # per worker: {"path"} to read, or {"prompt", "seed", "file"} to make
    pairs_per_worker: int
    output_partial: str
    output_token: str
    sample_sets: list[WorkerSamples] = field(default_factory=list)  # made before or after training
    started_at: float = field(default_factory=clock_start)  # the command's: workers' lines share its clock
    settings: dict = field(default_factory=dict)  # what a resumed checkpoint must match (files/checkpoints.fingerprint)
    resume_from: str | None = None  # a checkpoint folder to start from when Ray Train has none of this run
    logs_dir: Path | None = None  # this run's logs folder (TensorBoard, validation grids)
    progress_bars: bool = False  # whether the driver's terminal shows progress bars
    # Ray Train's local mode (the one worker in the command's process): the devices, which Ray
    # Train assigns otherwise, and the run folder that CheckpointWriter writes checkpoints to.
    local_devices: list[str] | None = None
    local_run_dir: Path | None = None
    use_gpu: bool = False
    gpus_per_worker: int = 0  # 0 on CPUs
    instance_paths: list[str] = field(default_factory=list)  # the subject's photos, in the order read
    instance_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # each photo's upright (height, width)
    instance_captions: dict[str, str] = field(default_factory=dict)  # the photos' own prompts (files/captions.py)

    def original_sizes(self) -> list[tuple[int, int]]:
        """The photos' sizes before resizing, in the order workers hold the photos (by path), for
        SDXL's micro-conditioning."""
        return [tuple(self.instance_sizes[path]) for path in sorted(self.instance_sizes)]

    def photo_prompts(self) -> list[str]:
        """Each photo's prompt, its caption or else --instance_prompt, in the order workers hold
        the photos (by path)."""
        return [self.instance_captions.get(path, self.config.instance_prompt) for path in sorted(self.instance_paths)]

    @property
    def flags(self) -> dict:
        """The settings that take effect on resume, as this run has them: each checkpoint records
        them, so that a run resumed from it can say which changed (files/checkpoints.py)."""
        return resumable_flags(self.config)

    @property
    def local(self) -> bool:
        """Whether the one worker runs in the command's own process (Ray Train's local mode)."""
        return self.local_devices is not None

    def total_steps(self) -> int:
        cfg = self.config
        pairs_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        return min(cfg.max_train_steps, cfg.num_epochs * math.ceil(self.pairs_per_worker / pairs_per_step))
