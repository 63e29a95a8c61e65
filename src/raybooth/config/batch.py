"""Settings of `raybooth batch` and `raybooth sweep`: many subjects, or many settings of one, at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.config.fields import option, positive
from raybooth.config.watch import VERBOSE_HELP

MANIFEST_HELP = (
    "YAML file of the subjects (default: the small world's demo, three subjects of two classes). Keys: `defaults`, "
    "a mapping of `raybooth run` options for every subject (model_dir, use_lora, max_train_steps, ...); "
    "`subjects`, a list of mappings, each with a `name` (its folder under --output_dir), `instance_images_dir` "
    "(its photos), `class_noun`, and optionally `unique_token`, `sample_prompts` and any `raybooth run` option of "
    "its own; for `raybooth sweep`, `sweep`: `flags` (each flag's values: a list, or {loguniform|uniform: [low, "
    "high]} / {randint: [low, high]} for random search), `subject` (whose photos; default: the first), `objective` "
    "(the measures to maximize, averaged; prior_leakage counts as 1 - leakage), `search` (grid or random) and "
    "`num_trials` (random). Relative paths are read from the file's folder. See docs/batch.md.")


@dataclass
class BatchConfig:
    manifest: Path | None = option(None, MANIFEST_HELP)
    output_dir: Path = option(Path("raybooth-batch"), "Folder for every subject's (or trial's) folder, batch.json "
                                                      "(sweep.json), the contact sheet and the class images.")
    class_images_store: Path | None = option(None, "Folder of class images shared by every subject of one class "
                                                   "(model, class prompt, resolution, sampler, seed), kept for later "
                                                   "batches (default: OUTPUT_DIR/class-images).")
    subjects_per_gpu: int = option(1, "Subjects trained at once on each GPU: small LoRA jobs leave most of a GPU idle, "
                                      "and several at once can finish more subjects per hour (see docs/batch.md).")
    subjects_at_once: int | None = option(None, "Subjects trained at once in all (default: every GPU's "
                                                "--subjects_per_gpu, or one on CPU).")
    use_gpu: bool | None = option(None, "Train on GPUs (default: when the Ray cluster has any).")
    address: str | None = option(None, "Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray).")
    verbose: bool = option(False, VERBOSE_HELP)

    def validate(self) -> None:
        positive(subjects_per_gpu=self.subjects_per_gpu,
                 **({"subjects_at_once": self.subjects_at_once} if self.subjects_at_once is not None else {}))
