"""DreamBooth's prior-preserving diffusion loss in plain PyTorch: draw latents for the batch's
images, noise them at random timesteps, and compare the UNet's prediction with its target, the
instance half and the class half apart. Nothing here knows about Ray."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raybooth.models.modules import DreamBoothModels


@dataclass
class Loss:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, prior_loss_weight: float,
                            weights: torch.Tensor | None = None) -> Loss:
    """MSE on the instance half of the batch plus `prior_loss_weight` times MSE on the class half;
    with `weights`, each row's MSE is weighted first (Min-SNR)."""
    per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weights is not None:
        per_row = per_row * weights
    instance, prior = (half.mean() for half in per_row.chunk(2))
    return Loss(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv 2303.09556) for a model that predicts the noise or the
    velocity, as diffusers' training scripts compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (SD 1.x), or the velocity (SD 2.x 768)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass
class Batch:
    """One step's examples, instance rows first, then class rows; `prompt_ids` matches row for row.
    Rows whose VAE latent distribution was computed ahead (class images at the training resolution,
    instance crops drawn before: batches.py) come as that distribution (mean, std) after the rows
    given as pixels; encoding the same image again each step would give the same distribution."""

    pixels: torch.Tensor | None  # the rows to encode this step, in [-1, 1]; None when every row's is known
    prompt_ids: torch.Tensor
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None  # the text encoders' output for prompt_ids, when computed once
    pooled_embeds: torch.Tensor | None = None  # with prompt_embeds, SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # SDXL: each row's original size, crop corner and target size


def latent_distribution(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for `pixels`, unscaled, in fp32."""
    latent_dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return latent_dist.mean.float(), latent_dist.std.float()


def sample_latents(models: DreamBoothModels, batch: Batch) -> torch.Tensor:
    """Scaled latents of every row: one fresh draw from each image's latent distribution, cached
    or encoded now, with one call for the noise, so both ways consume the same random numbers."""
    with torch.no_grad():
        mean, std = batch.latent_mean, batch.latent_std
        if batch.pixels is not None:
            encoded_mean, encoded_std = latent_distribution(models.vae, batch.pixels)
            mean, std = ((encoded_mean, encoded_std) if mean is None
                         else (torch.cat([encoded_mean, mean]), torch.cat([encoded_std, std])))
        latents = mean + std * torch.randn_like(std)
    return latents * models.vae.config.scaling_factor


def dreambooth_loss(models: DreamBoothModels, batch: Batch, prior_loss_weight: float, *, offset_noise: bool = False,
                    snr_gamma: float | None = None) -> Loss:
    """`offset_noise`: diffusers' 0.1 x per-image, per-channel offset; `snr_gamma`: Min-SNR weights."""
    latents = sample_latents(models, batch)
    noise = torch.randn_like(latents)
    if offset_noise:
        noise = noise + OFFSET_NOISE_SCALE * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_states, pooled = ((batch.prompt_embeds.to(models.device), batch.pooled_embeds)
                              if batch.prompt_embeds is not None else models.encode_prompts(batch.prompt_ids))
    # SDXL's UNet also takes the pooled text embedding and each row's size and crop (models/families/).
    added = None if batch.time_ids is None else {"text_embeds": pooled.to(models.device), "time_ids": batch.time_ids}
    if not torch.is_autocast_enabled(latents.device.type):  # the UNet computes in its weights' dtype
        noisy_latents, encoder_states = noisy_latents.to(models.dtype), encoder_states.to(models.dtype)
        added = None if added is None else {name: value.to(models.dtype) for name, value in added.items()}
    prediction = models.unet(noisy_latents, timesteps, encoder_states, added_cond_kwargs=added).sample
    target = diffusion_target(models.noise_scheduler, latents, noise, timesteps)
    weights = None if snr_gamma is None else min_snr_weights(models.noise_scheduler, timesteps, snr_gamma)
    return prior_preservation_loss(prediction, target, prior_loss_weight, weights)


OFFSET_NOISE_SCALE = 0.1  # diffusers' train_dreambooth.py
