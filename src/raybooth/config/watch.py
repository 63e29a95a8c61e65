"""Options for watching a run: what the terminal shows, TensorBoard, and sample grids during
training (diffusers' names: --report_to, --logging_dir, --validation_prompt, --validation_steps,
--num_validation_images). TrainConfig inherits them; keyword-only, so their defaults may precede
TrainConfig's required fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.config.fields import check_prompts_given, option, positive
from raybooth.errors import RayboothError

REPORT_TO = ("tensorboard", "none")
LOGS_DIR = "logs"  # the default --logging_dir inside --output_dir, kept with the output
VERBOSE_HELP = ("Show Ray's own output (its processes' logs, warnings, Ray Data's progress) in the terminal "
                "too; it always goes to a log file, named once at the start.")


@dataclass(kw_only=True)
class WatchOptions:
    verbose: bool = option(False, VERBOSE_HELP)
    report_to: str = option("tensorboard", "Log loss, learning rate, throughput and validation images to "
                                           "TensorBoard event files in --logging_dir (none: no events).",
                            choices=REPORT_TO)
    logging_dir: Path = option(Path(LOGS_DIR), "Folder for TensorBoard events, validation grids and Ray's log, "
                                               "a subfolder per run; relative to --output_dir, as in diffusers "
                                               "(inside it, written in Ray Train's run folder until the output "
                                               "is done).")
    validation_prompt: str | None = option(None, "Every --validation_steps, sample this prompt with the model "
                                                 "being trained (on rank 0; the others wait) into a grid PNG.")
    validation_steps: int = option(100, "Steps between validation grids (with --validation_prompt).")
    num_validation_images: int = option(4, "Images per validation grid.")
    validation_inference_steps: int = option(25, "Denoising steps per validation image: few, so that the other "
                                                 "workers wait briefly.")

    def validate_watch(self, output_dir: Path) -> None:
        positive(validation_steps=self.validation_steps, num_validation_images=self.num_validation_images,
                 validation_inference_steps=self.validation_inference_steps)
        if self.validation_prompt is not None:
            check_prompts_given("--validation_prompt", [self.validation_prompt])
        if self.logs_root(output_dir) == Path(output_dir).expanduser().absolute():
            raise RayboothError(f"--logging_dir {self.logging_dir} is --output_dir itself: give a folder in it "
                                f"(the default is {LOGS_DIR}) or elsewhere")

    def logs_root(self, output_dir: Path) -> Path:
        """--logging_dir joined onto --output_dir (an absolute one stays as it is)."""
        return (Path(output_dir).expanduser() / Path(self.logging_dir).expanduser()).absolute()


# What watching adds to the output folder beside the model: the logs folder (by default), the
# report and the metrics. An output holding them still counts as a model, to --overwrite.
REPORT_FILE, METRICS_FILE = "report.png", "metrics.json"
OUTPUT_EXTRAS = (LOGS_DIR, REPORT_FILE, METRICS_FILE)
