"""What diffusion samples do to an image, imitated on clean renders so the world classifier judges
samples as it judges renders: blur (a small VAE loses fine detail), noise (unfinished denoising),
blotchy low-frequency colour shifts (latent artefacts) and a little colour jitter. The jitter stays
well under the gaps between the world's colours (orange and yellow differ by 80 in green)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_BLUR_SIGMA = 1.4
MAX_NOISE = 0.08  # standard deviation, in [0, 1] pixel units
MAX_BLOTCH = 0.06
BRIGHTNESS, CHANNEL_GAIN, CONTRAST = 0.12, 0.06, 0.15


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each NCHW image blurred with its own sigma (0 leaves it as it is). The separable Gaussian is
    applied as two batched matrix products (rows, then columns), far cheaper on CPU than a grouped
    convolution; each kernel row is renormalised at the borders, where it would reach outside."""
    height, width = images.shape[-2:]

    def kernel_matrix(size: int) -> torch.Tensor:
        positions = torch.arange(size, dtype=images.dtype)
        distance = positions[None, :, None] - positions[None, None, :]
        weights = torch.exp(-distance ** 2 / (2 * sigmas.clamp(min=1e-3)[:, None, None] ** 2))
        return weights / weights.sum(dim=2, keepdim=True)

    rows = kernel_matrix(height)[:, None]
    columns = rows if width == height else kernel_matrix(width)[:, None]
    return rows @ images @ columns.transpose(-1, -2)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A randomly degraded copy of NCHW images in [0, 1]; `generator` makes it repeatable."""
    batch = images.shape[0]

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    def sometimes(probability: float) -> torch.Tensor:
        return (torch.rand(batch, 1, 1, 1, generator=generator) < probability).float()

    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(batch, 1, 1, 1, low=1 - CONTRAST, high=1 + CONTRAST / 2)
    images = mean + (images - mean) * contrast
    gain = uniform(batch, 1, 1, 1, low=1 - BRIGHTNESS, high=1 + BRIGHTNESS)
    gain = gain * uniform(batch, 3, 1, 1, low=1 - CHANNEL_GAIN, high=1 + CHANNEL_GAIN)
    images = images * gain
    blur = uniform(batch, high=MAX_BLUR_SIGMA) * sometimes(0.7).flatten()
    images = gaussian_blur(images, blur)
    blotches = torch.randn(batch, 3, 4, 4, generator=generator) * uniform(batch, 1, 1, 1, high=MAX_BLOTCH)
    images = images + F.interpolate(blotches, size=images.shape[-2:], mode="bilinear", align_corners=False)
    noise = uniform(batch, 1, 1, 1, high=MAX_NOISE) * sometimes(0.7)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)
