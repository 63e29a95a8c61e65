"""The worker's training examples, held in memory on its device: the subject's photos, randomly
cropped afresh each step, and its share of the class images, whose VAE latent distributions are
computed once when they are at the training resolution already (generated ones are). A photo
has few distinct crops (one, when it is square), so each crop's latent distribution is kept the
first time it is drawn, and the step runs no VAE at all. Batches have a fixed shape, so the step
can run as a CUDA graph. Plain PyTorch; no Ray here."""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np
import torch

from raybooth.training import Batch, latent_distribution


def to_device_image(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 HWC (as read) to uint8 CHW on `device`: a quarter of float32's memory."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)  # a copy: Ray's are read-only


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] to float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


# Latent distributions kept for at most this many bytes of a worker's device memory: 8,192 crops
# at 512 px. Photos with more distinct crops than that are encoded in each step instead.
MAX_REMEMBERED_BYTES = 2**30


class Crop(NamedTuple):
    """Which part of which photo a row shows: the key of its remembered latent distribution."""
    image: int
    top: int
    left: int
    flipped: bool


def encode(vae: torch.nn.Module, images: list[torch.Tensor], chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent distributions (mean, std) of uint8 CHW images, `chunk` images a VAE call."""
    with torch.no_grad():
        parts = [latent_distribution(vae, normalize(torch.stack(images[start:start + chunk])))
                 for start in range(0, len(images), chunk)]
    means, stds = zip(*parts)
    return torch.cat(means), torch.cat(stds)


def pairing(instances: int, classes: int, pairs: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(instance, class) indices of this worker's `pairs` pairs per epoch. Class images are its own
    share, each in turn; instance images are shared by all workers, which take them in turn too,
    so that five photos against 200 class images pair each photo 40 times, each class image once."""
    return [((rank + j * world_size) % instances, j % classes) for j in range(pairs)]


class TrainingSet:
    def __init__(self, instance_images: list[np.ndarray], class_images: list[np.ndarray], resolution: int,
                 pairs: list[tuple[int, int]], batch_size: int, instance_prompt_ids: np.ndarray,
                 class_prompt_ids: np.ndarray, device: torch.device, seed: int, *, accumulation: int = 1,
                 center_crop: bool = False, random_flip: bool = False):
        if not class_images:
            raise ValueError("a worker has no class images")
        self.resolution, self.pairs, self.batch_size, self.device = resolution, pairs, batch_size, device
        # A step takes `accumulation` micro-batches of `batch_size` pairs (gradient accumulation).
        self.accumulation, self.center_crop, self.random_flip = accumulation, center_crop, random_flip
        self.prompt_embeds: torch.Tensor | None = None  # set when the prompts are encoded once
        self.instance_images = [to_device_image(image, device) for image in instance_images]
        self.class_images = [to_device_image(image, device) for image in class_images]
        self.class_latents: tuple[torch.Tensor, torch.Tensor] | None = None
        self.vae: torch.nn.Module | None = None  # set when the instance crops' latents are remembered
        self.crop_latents: dict[Crop, tuple[torch.Tensor, torch.Tensor]] = {}
        ids = np.concatenate([np.tile(instance_prompt_ids, (batch_size, 1)), np.tile(class_prompt_ids, (batch_size, 1))])
        self.prompt_ids = torch.from_numpy(ids).to(device)
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

    def encode_ahead(self, vae: torch.nn.Module) -> list[str]:
        """What can be encoded before the step (the class images now, the instance crops as they
        are drawn), with a line for the log each."""
        done = []
        if self.cache_class_latents(vae):
            done.append("class images encoded once: they are at the training resolution")
        if self.remember_crop_latents(vae):
            done.append(f"each of the photos' {self.distinct_crops()} possible crops is encoded once, when first drawn")
        return done

    def remember_crop_latents(self, vae: torch.nn.Module, max_bytes: int = MAX_REMEMBERED_BYTES) -> bool:
        """From now on, encode each instance crop once, the first time a batch draws it, and keep
        its latent distribution: the crops are drawn as before, and each is encoded no more often
        than before. Only with the class latents cached (the rows stay instance rows first), and
        when every distinct crop's distribution fits in `max_bytes`. Returns whether it will."""
        config = vae.config
        side = self.resolution // 2 ** (len(config.block_out_channels) - 1)
        bytes_per_crop = 2 * config.latent_channels * side * side * 4  # mean and std, fp32
        if self.class_latents is None or self.distinct_crops() * bytes_per_crop > max_bytes:
            return False
        self.vae = vae
        return True

    @property
    def encodes_in_step(self) -> bool:
        """Whether the step encodes images (the photos' crops, and class crops when not cached)."""
        return self.vae is None

    def distinct_crops(self) -> int:
        """How many different instance crops the random crops and flips can draw."""
        per_image = [1 if self.center_crop else (h - self.resolution + 1) * (w - self.resolution + 1)
                     for h, w in (image.shape[1:] for image in self.instance_images)]
        return sum(per_image) * (2 if self.random_flip else 1)

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

    def latents_of(self, crops: list[Crop]) -> tuple[torch.Tensor, torch.Tensor]:
        """The remembered latent distributions of `crops`, encoding the ones drawn for the first time."""
        new = list(dict.fromkeys(crop for crop in crops if crop not in self.crop_latents))
        if new:  # rows of encode's own tensors, which hold nothing else (an fp32 VAE's mean is a view)
            self.crop_latents.update(zip(new, zip(*encode(self.vae, self.crop_images(new)))))
        means, stds = zip(*(self.crop_latents[crop] for crop in crops))
        return torch.stack(means), torch.stack(stds)

    def batch(self, pairs: list[tuple[int, int]]) -> Batch:
        crops = [self.instance_crop(i) for i, _ in pairs]
        classes = [c for _, c in pairs]
        if self.class_latents is not None:
            # Indexing with host ints, not a tensor: copying an index tensor in would wait on the GPU.
            mean, std = (torch.stack([latents[c] for c in classes]) for latents in self.class_latents)
            if self.vae is None:
                return Batch(self.crop_pixels(crops), self.prompt_ids, mean, std, self.prompt_embeds)
            instance_mean, instance_std = self.latents_of(crops)
            return Batch(None, self.prompt_ids, torch.cat([instance_mean, mean]), torch.cat([instance_std, std]),
                         self.prompt_embeds)
        class_crops = [self.cut(self.class_images[c], *self.corner(self.class_images[c], self.center_crop))
                       for c in classes]
        pixels = torch.cat([self.crop_pixels(crops), normalize(torch.stack(class_crops))])
        return Batch(pixels, self.prompt_ids, prompt_embeds=self.prompt_embeds)

    def step_batch(self, pairs: list[tuple[int, int]]) -> Batch | list[Batch]:
        """One step's examples: a batch, or with accumulation its micro-batches."""
        if self.accumulation == 1:
            return self.batch(pairs)
        return [self.batch(pairs[start:start + self.batch_size]) for start in range(0, len(pairs), self.batch_size)]

    def batches(self, num_epochs: int, max_steps: int, step: int = 0,
                resume: dict | None = None) -> Iterator[tuple[int, int, Batch | list[Batch]]]:
        """(step, epoch, batch) until `num_epochs` pass or `max_steps` are taken. Steps count from 1;
        after a checkpoint, `step` and `resume` (a `position()` taken then) continue where it was."""
        first_epoch, order, index = 0, None, 0
        if resume:
            self.rng.bit_generator.state = resume["rng"]
            first_epoch, order, index = resume["epoch"], [tuple(pair) for pair in resume["order"]], resume["next"]
        for epoch in range(first_epoch, num_epochs):
            order = order or self.epoch_order()
            while index < len(order) and step < max_steps:
                step, start, index = step + 1, index, index + self.pairs_per_step
                batch = self.step_batch(order[start:index])
                self._position = {"rng": self.rng.bit_generator.state, "epoch": epoch, "order": order, "next": index}
                yield step, epoch, batch
            if step >= max_steps:
                return
            order, index = None, 0

    def position(self) -> dict:
        """Where the latest batch left the data: its epoch's order, the next pair, the random state."""
        return self._position
