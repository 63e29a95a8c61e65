"""The worker's training examples, held in memory on its device: the subject's photos, randomly
cropped afresh each step, and its share of the class images, whose VAE latent distributions are
computed once when they are at the training resolution already (generated ones are). Batches
have a fixed shape, so the step can run as a CUDA graph. Plain PyTorch; no Ray here."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from raybooth.training import Batch, latent_distribution


def to_device_image(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 HWC (as read) to uint8 CHW on `device`: a quarter of float32's memory."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)  # a copy: Ray's are read-only


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] to float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


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
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(self.class_images), chunk):
                pixels = normalize(torch.stack(self.class_images[start:start + chunk]))
                mean, std = latent_distribution(vae, pixels)
                means.append(mean)
                stds.append(std)
        self.class_latents = (torch.cat(means), torch.cat(stds))
        self.class_images = []  # the latents replace them
        return True

    def epoch_order(self) -> list[tuple[int, int]]:
        """This epoch's pairs in a fresh random order, topped up with random pairs to whole batches."""
        order = [self.pairs[i] for i in self.rng.permutation(len(self.pairs))]
        shortfall = self.steps_per_epoch * self.pairs_per_step - len(order)
        return order + [self.pairs[i] for i in self.rng.integers(0, len(self.pairs), shortfall)]

    def crop(self, image: torch.Tensor, center: bool = False) -> torch.Tensor:
        height, width = image.shape[1:]
        if center:
            top, left = (height - self.resolution) // 2, (width - self.resolution) // 2
        else:
            top = int(self.rng.integers(0, height - self.resolution + 1))
            left = int(self.rng.integers(0, width - self.resolution + 1))
        return image[:, top:top + self.resolution, left:left + self.resolution]

    def instance_crop(self, image: torch.Tensor) -> torch.Tensor:
        crop = self.crop(image, self.center_crop)
        return crop.flip(-1) if self.random_flip and self.rng.random() < 0.5 else crop

    def batch(self, pairs: list[tuple[int, int]]) -> Batch:
        instance = [self.instance_crop(self.instance_images[i]) for i, _ in pairs]
        classes = [c for _, c in pairs]
        if self.class_latents is not None:
            # Indexing with host ints, not a tensor: copying an index tensor in would wait on the GPU.
            mean, std = (torch.stack([latents[c] for c in classes]) for latents in self.class_latents)
            return Batch(normalize(torch.stack(instance)), self.prompt_ids, mean, std, self.prompt_embeds)
        crops = [self.crop(self.class_images[c], self.center_crop) for c in classes]
        return Batch(normalize(torch.stack(instance + crops)), self.prompt_ids, prompt_embeds=self.prompt_embeds)

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
