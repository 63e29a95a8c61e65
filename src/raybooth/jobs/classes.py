"""The class-image store: class images made once per class and shared by every subject (and every
sweep trial) of that class, in a folder named for what makes them what they are (the model, the
class prompt, the resolution, the sampler, its steps and guidance, the seed), so that a later batch
of the same class finds them made. The images are `raybooth generate`'s, named and seeded as a
training worker would make them (files/names.py): the subjects' training finds none to make."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from raybooth.config import GenerateConfig, TrainConfig
from raybooth.config.fields import inference_steps
from raybooth.driver.generation import generate
from raybooth.files.names import image_name
from raybooth.errors import first_line
from raybooth.files.writes import write_atomically
from raybooth.models.folders import resolve_model_dir, resolve_resolution
from raybooth.terminal.log import log


@dataclass(frozen=True)
class ImageClass:
    """What makes one class's images what they are."""

    model_dir: str
    class_prompt: str
    resolution: int
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    seed: int

    def folder(self, store: Path) -> Path:
        digest = hashlib.sha1(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:10]
        return store / f"{image_name(self.class_prompt, 0).rsplit('-', 2)[0]}-{digest}"


def image_class(cfg: TrainConfig) -> ImageClass:
    model_dir = resolve_model_dir(cfg.model_dir)
    return ImageClass(str(model_dir), cfg.class_prompt, resolve_resolution(model_dir, cfg.resolution), cfg.sampler,
                      inference_steps(cfg.sampler, cfg.num_inference_steps), cfg.guidance_scale, cfg.seed)


def make_class_images(configs: dict[str, TrainConfig], store: Path, use_gpu: bool | None, address: str | None,
                      verbose: bool) -> dict[str, str]:
    """Point each subject's `class_images_dir` at its class's folder in `store`, and make the images
    each class lacks, once for all its subjects. Returns {subject: error} for the classes that could
    not be made (their subjects cannot train)."""
    classes: dict[ImageClass, list[str]] = {}
    for name, cfg in configs.items():
        classes.setdefault(image_class(cfg), []).append(name)
    failed = {}
    for kind, names in classes.items():
        folder = kind.folder(store)
        for name in names:
            configs[name].class_images_dir = folder
        count = max(configs[name].num_class_images for name in names)
        log(f"class images for {kind.class_prompt!r} ({', '.join(names)}): {folder}")
        try:
            generate(GenerateConfig(model_dir=Path(kind.model_dir), output_dir=folder, prompts=[kind.class_prompt],
                                    num_samples_per_prompt=count, sampler=kind.sampler,
                                    num_inference_steps=kind.num_inference_steps, guidance_scale=kind.guidance_scale,
                                    resolution=kind.resolution, seed=kind.seed, safety_checker=False,
                                    batch_size=configs[names[0]].sample_batch_size, use_gpu=use_gpu,
                                    address=address, verbose=verbose))
        except Exception as error:  # noqa: BLE001 - its subjects fail, the others go on
            failed |= {name: f"its class images could not be made: {first_line(error)}" for name in names}
            continue
        about = folder.with_name(f"{folder.name}.json")  # beside the images: what made them
        write_atomically(about, (json.dumps(kind.__dict__, indent=2) + "\n").encode())
    return failed
