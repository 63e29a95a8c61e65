"""The small world's judge: a small CNN that tells, from a 64x64 image, the object's class, whether
it is the held-out subject (the checkerboard toy car), the background, the object's colour, and
whether the image shows an object of the world at all (or only a background, or noise).
It is trained on rendered scenes degraded as diffusion samples are (augment.py), since it judges
samples of the world model, not clean renders.

    python -m raybooth.world.classifier --output PATH [--steps N]

trains it reproducibly on one CPU core (10 to 20 minutes on a busy 2-core machine; rendering the
scenes takes one or two); PATH gets the weights (safetensors) and PATH.json its settings and
held-out accuracy. The shipped copy lives in weights/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raybooth.errors import RayboothError
from raybooth.world.classifier_data import CONTENTS
from raybooth.world.scenes import BACKGROUNDS, CLASSES, COLORS

IMAGE_SIZE = 64
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
HEADS = {"class": CLASSES, "subject": (False, True), "background": BACKGROUNDS, "color": COLORS, "content": CONTENTS}


def settings_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


class WorldClassifier(nn.Module):
    """Images are averaged down to 32 px first (the checkerboard's squares stay 3-4 px wide, and a
    quarter of the pixels makes CPU training four times cheaper), then four conv stages (32 -> 4
    px), pooled by mean and by max (the max keeps a small patch of pattern from washing out over
    the frame), then one linear head per attribute."""

    def __init__(self, width: int = 16):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        for stage, (inputs, outputs) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]
            if 0 < stage < len(channels) - 2:  # two convs in the middle stages, one at either end
                layers += [nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]
            if stage < len(channels) - 2:
                layers.append(nn.MaxPool2d(2))
        self.width = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels[-1], len(values)) for name, values in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for NCHW pixels in [0, 1]."""
        features = self.features(pixels * 2 - 1)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | list[np.ndarray]) -> dict[str, np.ndarray]:
        """For uint8 HxWx3 images (any size; resized to 64 px): "class", "background" and "color"
        as indices into CLASSES, BACKGROUNDS and COLORS (the best guess, even where there is no
        object or no world to see), "object" (bool: an object of the world is there), "scene"
        (bool: a background of the world is there), "subject" (bool: an object, and the subject),
        "subject_probability" (the subject head's alone) and "content" (index into CONTENTS)."""
        self.eval()
        pixels = to_tensor(images)
        logits = {name: [] for name in HEADS}
        for start in range(0, len(pixels), 256):
            for name, values in self(pixels[start:start + 256]).items():
                logits[name].append(values)
        joined = {name: torch.cat(values) if values else torch.zeros(0, len(HEADS[name]))
                  for name, values in logits.items()}
        predictions = {name: values.argmax(dim=1).numpy() for name, values in joined.items()}
        predictions["object"] = predictions["content"] == CONTENTS.index("object")
        predictions["scene"] = predictions["content"] != CONTENTS.index("nothing")
        predictions["subject"] = predictions["subject"].astype(bool) & predictions["object"]
        predictions["subject_probability"] = joined["subject"].softmax(dim=1)[:, 1].numpy()
        return predictions


def to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """NCHW float pixels in [0, 1] at 64 px from uint8 HxWx3 images."""
    resized = [image if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else
               np.asarray(Image.fromarray(image).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                      Image.Resampling.BICUBIC))
               for image in images]
    if not resized:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(np.stack(resized)[..., :3]).permute(0, 3, 1, 2).float() / 255


def load_classifier(path: Path | None = None) -> WorldClassifier:
    """The classifier saved at `path` (default: the one shipped with raybooth), checked against
    the world it was trained on: if the world's classes, backgrounds or colours changed since,
    its indices would name the wrong things."""
    from safetensors.torch import load_file

    path = Path(path or DEFAULT_WEIGHTS)
    if not path.is_file() or not settings_path(path).is_file():
        raise RayboothError(f"no world classifier at {path} (and its {settings_path(path).name}); train one with "
                            f"`python -m raybooth.world.classifier --output {path}`")
    settings = json.loads(settings_path(path).read_text())
    for name, values in HEADS.items():
        if name != "subject" and tuple(settings["labels"][name]) != tuple(values):
            raise RayboothError(f"the world classifier at {path} was trained on other {name} labels "
                                f"({settings['labels'][name]}) than the world has now; retrain it")
    model = WorldClassifier(settings["width"])
    model.load_state_dict(load_file(path))
    return model.eval()


@dataclass
class TrainSettings:
    steps: int = 1200
    batch_size: int = 64
    train_scenes: int = 5000
    test_scenes: int = 1000
    width: int = 16
    lr: float = 3e-3
    seed: int = 0


def train_classifier(settings: TrainSettings, say=print) -> tuple[WorldClassifier, dict]:
    """A classifier trained as `settings` say, and its accuracy on held-out scenes."""
    # One thread: on a busy two-core machine two threads spin against each other (a step took 20x
    # longer), and the result does not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(settings, say)
    finally:
        torch.set_num_threads(threads)


def _train(settings: TrainSettings, say) -> tuple[WorldClassifier, dict]:
    from raybooth.world.augment import augment
    from raybooth.world.classifier_data import accuracy, as_float, render_set

    torch.manual_seed(settings.seed)
    started = time.monotonic()
    train_pixels, train_labels = render_set(settings.train_scenes, seed=settings.seed)
    test_pixels, test_labels = render_set(settings.test_scenes, seed=settings.seed + 10_000)
    say(f"rendered {settings.train_scenes} training and {settings.test_scenes} test scenes "
        f"in {time.monotonic() - started:.0f}s")
    model = WorldClassifier(settings.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    for step in range(1, settings.steps + 1):
        batch = torch.randint(len(train_pixels), (settings.batch_size,), generator=generator)
        logits = model(augment(as_float(train_pixels[batch]), generator))
        loss = sum(F.cross_entropy(logits[name], train_labels[name][batch], ignore_index=-1) for name in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.steps:
            say(f"step {step}/{settings.steps}: loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)")
    model.eval()
    clean = accuracy(model, test_pixels, test_labels)
    degraded = accuracy(model, augment(as_float(test_pixels), torch.Generator().manual_seed(settings.seed + 1)), test_labels)
    return model, {"clean": clean, "augmented": degraded, "seconds": round(time.monotonic() - started)}


def save_classifier(model: WorldClassifier, held_out: dict, settings: TrainSettings, path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, path)
    record = {"width": model.width, "image_size": IMAGE_SIZE, "training": dataclasses.asdict(settings),
              "labels": {name: list(values) for name, values in HEADS.items() if name != "subject"},
              "held_out_accuracy": held_out}
    settings_path(path).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raybooth.world.classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS, help="Weights file to write (.safetensors).")
    defaults = TrainSettings()
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    model, held_out = train_classifier(settings)
    save_classifier(model, held_out, settings, args.output)
    print(json.dumps(held_out, indent=2))
    print(args.output)


if __name__ == "__main__":
    main()
