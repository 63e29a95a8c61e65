"""The worker's training examples, held in memory on its device: the subject's photos, randomly
cropped afresh each step, and its share of the class images, whose VAE latent distributions are
computed once when they are at the training resolution already (generated ones are). A photo
has few distinct crops (one, when it is square), so each crop's latent distribution is kept once
encoded (crop_latents.py), and the step runs no VAE at all. Batches have a fixed shape, so the
step can run as a CUDA graph. Plain PyTorch; no Ray here."""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from raybooth.models.families import time_ids
from raybooth.train.crop_latents import (DRAWS_PER_CROP_TO_ENCODE_FIRST, MAX_REMEMBERED_BYTES, Crop, CropLatents,
                                         bytes_per_crop, encode, normalize)
from raybooth.train.loss import Batch
from raybooth.train.row_prompts import RowPrompts


def to_device_image(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 HWC (as read) to uint8 CHW on `device`: a quarter of float32's memory."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)  # a copy: Ray's are read-only


class Draw(NamedTuple):
    """A micro-batch's random choices: its instance crops, its class images, and where those are
    cut when their latents are not cached (None when they are)."""
    crops: list[Crop]
    classes: list[int]
    class_corners: list[tuple[int, int]] | None


def pairing(instances: int, classes: int, pairs: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(instance, class) indices of this worker's `pairs` pairs per epoch. Class images are its own
    share, each in turn; instance images are shared by all workers, which take them in turn too,
    so that five photos against 200 class images pair each photo 40 times, each class image once."""
    return [((rank + j * world_size) % instances, j % classes) for j in range(pairs)]


class TrainingSet:
    def __init__(self, instance_images: list[np.ndarray], class_images: list[np.ndarray], resolution: int,
                 pairs: list[tuple[int, int]], batch_size: int, instance_prompt_ids: np.ndarray,
                 class_prompt_ids: np.ndarray, device: torch.device, seed: int, *, accumulation: int = 1,
                 center_crop: bool = False, random_flip: bool = False,
                 original_sizes: list[tuple[int, int]] | None = None, photo_prompt_ids: list[np.ndarray] | None = None):
        if not class_images:
            raise ValueError("a worker has no class images")
        self.resolution, self.pairs, self.batch_size, self.device = resolution, pairs, batch_size, device
        # A step takes `accumulation` micro-batches of `batch_size` pairs (gradient accumulation).
        self.accumulation, self.center_crop, self.random_flip = accumulation, center_crop, random_flip
        # SDXL's micro-conditioning: each photo's (height, width) before it was resized; None for SD.
        self.original_sizes = original_sizes
        self.instance_images = [to_device_image(image, device) for image in instance_images]
        self.class_images = [to_device_image(image, device) for image in class_images]
        self.class_latents: tuple[torch.Tensor, torch.Tensor] | None = None
        self.crop_latents: CropLatents | None = None  # set when the instance crops' latents are remembered
        # Each photo's prompt ids (its caption's, where it has one), the class prompt's on class rows.
        self.prompts = RowPrompts(photo_prompt_ids or [instance_prompt_ids] * len(instance_images), class_prompt_ids,
                                  device)
        self.rng = np.random.default_rng(seed)  # crops and order: host-side, so no step waits on the GPU

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.pairs) / self.pairs_per_step)

    def cache_class_latents(self, vae: torch.nn.Module, chunk: int = 16) -> bool:
        """Encode the class images once, when every one is exactly at the training resolution
        (their random crop is the whole image, so each step would encode the same image again).
        Returns whether it did."""
        side = self.resolution
        if not all(image.shape[1:] == (side, side) for image in self.class_images):
            return False
        self.class_latents = encode(vae, self.class_images, chunk)
        self.class_images = []  # the latents replace them
        return True

    def epoch_order(self) -> list[tuple[int, int]]:
        """This epoch's pairs in a fresh random order, topped up with random pairs to whole batches."""
        order = [self.pairs[i] for i in self.rng.permutation(len(self.pairs))]
        shortfall = self.steps_per_epoch * self.pairs_per_step - len(order)
        return order + [self.pairs[i] for i in self.rng.integers(0, len(self.pairs), shortfall)]

    def encode_ahead(self, vae: torch.nn.Module, steps: int, say: Callable[[str], None]) -> None:
        """Encode what can be before the step: the class images now, the instance crops as they
        are drawn, or all of them now when a run of `steps` steps would draw each about twice."""
        if self.cache_class_latents(vae):
            say("class images encoded once: they are at the training resolution")
        if not self.remember_crop_latents(vae):
            return
        crops, draws = self.distinct_crops(), steps * self.pairs_per_step
        if draws < DRAWS_PER_CROP_TO_ENCODE_FIRST * crops:
            say(f"each of the photos' {crops} possible crops is encoded once, when first drawn")
            return
        say(f"encoding the photos' {crops} possible crops once, before the first step: "
            f"the run draws each {draws / crops:.0f} times on average")
        self.crop_latents.encode_new(self.all_crops())

    def remember_crop_latents(self, vae: torch.nn.Module, max_bytes: int = MAX_REMEMBERED_BYTES) -> bool:
        """From now on, encode each instance crop once, the first time a batch draws it, and keep
        its latent distribution: the crops are drawn as before, and each is encoded no more often
        than before. Only with the class latents cached (the rows stay instance rows first), and
        when every distinct crop's distribution fits in `max_bytes`. Returns whether it will."""
        if self.class_latents is None or self.distinct_crops() * bytes_per_crop(vae, self.resolution) > max_bytes:
            return False
        self.crop_latents = CropLatents(vae, self.crop_images)
        return True

    @property
    def encodes_in_step(self) -> bool:
        """Whether the step encodes images (the photos' crops, and class crops when not cached)."""
        return self.crop_latents is None

    def corners(self, image: torch.Tensor) -> tuple[range, range]:
        """The tops and lefts that the image's crops can have."""
        if self.center_crop:
            top, left = self.corner(image, center=True)
            return range(top, top + 1), range(left, left + 1)
        height, width = image.shape[1:]
        return range(height - self.resolution + 1), range(width - self.resolution + 1)

    def distinct_crops(self) -> int:
        """How many different instance crops the random crops and flips can draw."""
        per_image = [len(tops) * len(lefts) for tops, lefts in map(self.corners, self.instance_images)]
        return sum(per_image) * (2 if self.random_flip else 1)

    def all_crops(self) -> list[Crop]:
        flips = (False, True) if self.random_flip else (False,)
        return [Crop(index, top, left, flipped) for index, image in enumerate(self.instance_images)
                for tops, lefts in [self.corners(image)] for top in tops for left in lefts for flipped in flips]

    def corner(self, image: torch.Tensor, center: bool = False) -> tuple[int, int]:
        height, width = image.shape[1:]
        if center:
            return (height - self.resolution) // 2, (width - self.resolution) // 2
        return (int(self.rng.integers(0, height - self.resolution + 1)),
                int(self.rng.integers(0, width - self.resolution + 1)))

    def cut(self, image: torch.Tensor, top: int, left: int, flipped: bool = False) -> torch.Tensor:
        crop = image[:, top:top + self.resolution, left:left + self.resolution]
        return crop.flip(-1) if flipped else crop

    def instance_crop(self, index: int) -> Crop:
        top, left = self.corner(self.instance_images[index], self.center_crop)
        return Crop(index, top, left, bool(self.random_flip and self.rng.random() < 0.5))

    def crop_images(self, crops: list[Crop]) -> list[torch.Tensor]:
        return [self.cut(self.instance_images[crop.image], *crop[1:]) for crop in crops]

    def crop_pixels(self, crops: list[Crop]) -> torch.Tensor:
        return normalize(torch.stack(self.crop_images(crops)))

    def draw(self, pairs: list[tuple[int, int]]) -> Draw:
        """A micro-batch's random choices (the random numbers the batch takes, in their order)."""
        crops = [self.instance_crop(i) for i, _ in pairs]
        classes = [c for _, c in pairs]
        corners = None if self.class_latents is not None else [
            self.corner(self.class_images[c], self.center_crop) for c in classes]
        return Draw(crops, classes, corners)

    def time_ids(self, draw: Draw) -> torch.Tensor | None:
        """SDXL's micro-conditioning of each row, as diffusers' SDXL script computes it: the photo's
        size before resizing and the crop's corner in the resized (then flipped) photo. Class rows
        give their image as read (generated ones: the training size, uncropped)."""
        if self.original_sizes is None:
            return None
        side, rows = self.resolution, []
        for crop in draw.crops:
            width = self.instance_images[crop.image].shape[2]
            rows.append(time_ids(self.original_sizes[crop.image],
                                 (crop.top, width - side - crop.left if crop.flipped else crop.left), (side, side)))
        for index, corner in zip(draw.classes, draw.class_corners or [(0, 0)] * len(draw.classes)):
            size = (side, side) if self.class_latents is not None else tuple(self.class_images[index].shape[1:])
            rows.append(time_ids(size, corner, (side, side)))
        return torch.tensor(rows, dtype=torch.float32).to(self.device)

    def batch(self, draw: Draw) -> Batch:
        crops, classes = draw.crops, draw.classes
        prompts = dict(self.prompts.of([crop.image for crop in crops]), time_ids=self.time_ids(draw))
        if self.class_latents is not None:
            # Indexing with host ints, not a tensor: copying an index tensor in would wait on the GPU.
            mean, std = (torch.stack([latents[c] for c in classes]) for latents in self.class_latents)
            if self.crop_latents is None:
                return Batch(self.crop_pixels(crops), latent_mean=mean, latent_std=std, **prompts)
            instance_mean, instance_std = self.crop_latents.of(crops)
            return Batch(None, latent_mean=torch.cat([instance_mean, mean]), latent_std=torch.cat([instance_std, std]),
                         **prompts)
        class_crops = [self.cut(self.class_images[c], *corner) for c, corner in zip(classes, draw.class_corners)]
        pixels = torch.cat([self.crop_pixels(crops), normalize(torch.stack(class_crops))])
        return Batch(pixels, **prompts)

    def step_draws(self, pairs: list[tuple[int, int]]) -> list[Draw]:
        """One step's random choices: its micro-batches' (several with accumulation)."""
        return [self.draw(pairs[start:start + self.batch_size]) for start in range(0, len(pairs), self.batch_size)]

    def step_batch(self, draws: list[Draw]) -> Batch | list[Batch]:
        batches = [self.batch(draw) for draw in draws]
        return batches[0] if self.accumulation == 1 else batches

    def batches(self, num_epochs: int, max_steps: int, step: int = 0,
                resume: dict | None = None) -> Iterator[tuple[int, int, Batch | list[Batch]]]:
        """(step, epoch, batch) until `num_epochs` pass or `max_steps` are taken. Steps count from 1;
        after a checkpoint, `step` and `resume` (a `position()` taken then) continue where it was.
        Each step's crops are drawn one step ahead, so that its new crops can be encoded while the
        step before runs (crop_latents.CropLatents.stream); the random numbers come in the same order."""
        drawn = self.draws(num_epochs, max_steps, step, resume)
        upcoming = next(drawn, None)
        while upcoming is not None:
            step, epoch, draws, position = upcoming
            batch = self.step_batch(draws)
            upcoming = next(drawn, None)
            if upcoming is not None and self.crop_latents is not None:
                self.crop_latents.encode_new([crop for draw in upcoming[2] for crop in draw.crops])
            self._position = position
            yield step, epoch, batch

    def draws(self, num_epochs: int, max_steps: int, step: int,
              resume: dict | None) -> Iterator[tuple[int, int, list[Draw], dict]]:
        """(step, epoch, the step's draws, the position after them), as `batches` describes."""
        first_epoch, order, index = 0, None, 0
        if resume:
            self.rng.bit_generator.state = resume["rng"]
            first_epoch, order, index = resume["epoch"], [tuple(pair) for pair in resume["order"]], resume["next"]
        for epoch in range(first_epoch, num_epochs):
            order = order or self.epoch_order()
            while index < len(order) and step < max_steps:
                step, start, index = step + 1, index, index + self.pairs_per_step
                draws = self.step_draws(order[start:index])
                yield step, epoch, draws, {"rng": self.rng.bit_generator.state, "epoch": epoch, "order": order,
                                           "next": index}
            if step >= max_steps:
                return
            order, index = None, 0

    def position(self) -> dict:
        """Where the latest batch left the data: its epoch's order, the next pair, the random state."""
        return self._position
