"""The VAE latent distributions of the subject's photo crops, each encoded once and kept. A photo
resized to the resolution on its shorter side has few distinct crops: one when it is square,
(long side - resolution + 1) otherwise, twice that with random flips. `batches.py` draws the
crops; this module encodes each the first time it is asked for, or all of them before the first
step where the run would draw each about twice anyway. Plain PyTorch; no Ray here."""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from raybooth.train.loss import latent_distribution

# Latent distributions kept for at most this many bytes of a worker's device memory: 8,192 crops
# at 512 px. Photos with more distinct crops than that are encoded in each step instead.
MAX_REMEMBERED_BYTES = 2**30


# An H100 encodes a 512 px crop in about 14 ms alone and 6 in a batch of 16 (bench/RESULTS.md): a
# run that draws each crop this many times on average (86% of them at least once) encodes them all
# sooner in batches before its first step than one by one as they are drawn.
DRAWS_PER_CROP_TO_ENCODE_FIRST = 2


class Crop(NamedTuple):
    """Which part of which photo a row shows: the key of its remembered latent distribution."""
    image: int
    top: int
    left: int
    flipped: bool


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] to float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def encode(vae: torch.nn.Module, images: list[torch.Tensor], chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent distributions (mean, std) of uint8 CHW images, `chunk` images a VAE call."""
    with torch.no_grad():
        parts = [latent_distribution(vae, normalize(torch.stack(images[start:start + chunk])))
                 for start in range(0, len(images), chunk)]
    means, stds = zip(*parts)
    return torch.cat(means), torch.cat(stds)


def bytes_per_crop(vae: torch.nn.Module, resolution: int) -> int:
    """Device memory of one crop's kept distribution: its mean and std in fp32."""
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 * vae.config.latent_channels * side * side * 4


class CropLatents:
    """Each crop's (mean, std), encoded by `vae` from the pixels `cut` gives for it, the first time
    it is asked for; the same crop drawn again is the same image, so the same distribution."""

    def __init__(self, vae: torch.nn.Module, cut: Callable[[list[Crop]], list[torch.Tensor]]):
        self.vae, self.cut = vae, cut
        self.kept: dict[Crop, tuple[torch.Tensor, torch.Tensor]] = {}
        # A CUDA stream to encode new crops on, beside a CUDA-graphed step (batches.py asks for the
        # next step's crops one step ahead): a batch of one leaves most of the GPU idle. The worker
        # sets it: on an H100 the 1+1 step took 68.6 ms with it, 74.1 without (bench/RESULTS.md).
        self.stream: torch.cuda.Stream | None = None

    def encode_new(self, crops: list[Crop]) -> None:
        """Encode and keep the crops not encoded before; on `stream` where there is one, after the
        work queued so far, so that the step queued next runs beside the encoding."""
        new = list(dict.fromkeys(crop for crop in crops if crop not in self.kept))
        if not new:
            return
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            # Rows of encode's own tensors, which hold nothing else (an fp32 VAE's mean is a view).
            # They are kept for good, so no other stream can be handed their memory while in use.
            self.kept.update(zip(new, zip(*encode(self.vae, self.cut(new)))))

    def of(self, crops: list[Crop]) -> tuple[torch.Tensor, torch.Tensor]:
        """The distributions of `crops` as (means, stds), encoding those asked for the first time."""
        self.encode_new(crops)
        if self.stream is not None:  # the ones encoded beside the step before
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        means, stds = zip(*(self.kept[crop] for crop in crops))
        return torch.stack(means), torch.stack(stds)
