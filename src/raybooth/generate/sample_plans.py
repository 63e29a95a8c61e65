"""Images the training workers make with the model they already hold, beside training: the
pretrained model's before training, the tuned model's after it. Named and seeded as `raybooth
generate` names and seeds them, so a seed gives the same image either way; each worker makes its
share. Loading the model again in a Ray Data job for them costs 30-40 s a job on a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.files.names import image_name, image_seed


@dataclass
class SampleSet:
    """`per_prompt` images of each prompt into `folder`, from `seed`'s image seeds."""

    folder: Path
    prompts: list[str]
    per_prompt: int
    seed: int
    before_training: bool = False  # the pretrained model's (else the tuned model's)
    safety_checker: bool = True
    what: str = "samples"  # for the progress lines

    def rows(self) -> list[dict]:
        return [{"prompt": prompt, "seed": image_seed(self.seed, prompt, index), "file": image_name(prompt, index)}
                for prompt in self.prompts for index in range(self.per_prompt)]

    def paths(self, prompt: str | None = None) -> list[Path]:
        """The images' files: of `prompt`, or of every prompt in order."""
        folder = Path(self.folder).expanduser().absolute()
        return [folder / image_name(each, index) for each in ([prompt] if prompt else self.prompts)
                for index in range(self.per_prompt)]


@dataclass
class WorkerSamples:
    """A SampleSet as the workers get it: the folder, and each worker's rows."""

    folder: str
    before_training: bool
    safety_checker: bool
    what: str
    shares: list[list[dict]]  # per worker: {"prompt", "seed", "file"}


def share_out(items: list, workers: int) -> list[list]:
    """Worker r's share: every `workers`-th item from the r-th on."""
    return [items[rank::workers] for rank in range(workers)]


def plan_sample_set(samples: SampleSet, workers: int) -> WorkerSamples:
    """The folder made, an earlier model's images of these names removed (they would pass for
    this one's), and the rows shared out."""
    folder = Path(samples.folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise RayboothError(f"{folder} is a file, not a folder for samples")
    folder.mkdir(parents=True, exist_ok=True)
    rows = samples.rows()
    for row in rows:
        (folder / row["file"]).unlink(missing_ok=True)
    return WorkerSamples(str(folder), samples.before_training, samples.safety_checker, samples.what,
                         share_out(rows, workers))
