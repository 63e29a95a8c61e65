"""DreamBooth's training step in plain PyTorch: the prior-preserving diffusion loss, and the
precision policy around it. Nothing here knows about Ray; `trainer.py` runs it on workers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raybooth.models import half_precision_dtype


@dataclass
class DreamBoothModels:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # diffusers DDPMScheduler
    train_text_encoder: bool
    # 1, or 0 after --train_text_encoder_steps: scales the text encoder's gradient (a tensor a CUDA graph reads).
    text_encoder_gate: torch.Tensor | None = None
    masters: object | None = None  # masters.MasterWeights: with --bf16_gradients the optimizer steps fp32 masters

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_encoder_device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + ([self.text_encoder] if self.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def encode_prompts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden_states = self.text_encoder(prompt_ids.to(self.text_encoder_device))[0]
        if self.text_encoder_gate is not None and hidden_states.requires_grad:
            # The same values; the gradient flowing back is scaled by the gate.
            detached = hidden_states.detach()
            hidden_states = detached + self.text_encoder_gate.to(detached.device) * (hidden_states - detached)
        return hidden_states.to(self.device)


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
    prompt_embeds: torch.Tensor | None = None  # the text encoder's output for prompt_ids, when computed once


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
    encoder_states = (batch.prompt_embeds.to(models.device) if batch.prompt_embeds is not None
                      else models.encode_prompts(batch.prompt_ids))
    if not torch.is_autocast_enabled(latents.device.type):  # the UNet computes in its weights' dtype
        noisy_latents, encoder_states = noisy_latents.to(models.dtype), encoder_states.to(models.dtype)
    prediction = models.unet(noisy_latents, timesteps, encoder_states).sample
    target = diffusion_target(models.noise_scheduler, latents, noise, timesteps)
    weights = None if snr_gamma is None else min_snr_weights(models.noise_scheduler, timesteps, snr_gamma)
    return prior_preservation_loss(prediction, target, prior_loss_weight, weights)


OFFSET_NOISE_SCALE = 0.1  # diffusers' train_dreambooth.py


_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(mode: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs, full precision on CPU."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "bf16" if half_precision_dtype() == torch.bfloat16 else "fp16"
    return "no"


class Precision:
    """Mixed precision over fp32 master weights: the forward pass runs under autocast in
    `mode`'s dtype, weights and optimizer state stay fp32, and fp16 adds loss scaling.

    Pure bf16 weights (as in Ray's example) lose most AdamW updates: at lr 5e-6 an update is
    far below half a bf16 ulp of a typical weight and rounds away. fp32 masters keep them (with
    --bf16_gradients the modules compute on bf16 copies of them: masters.py).
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = resolve_precision(mode, device)
        self.device_type = device.type
        self.dtype = _DTYPES[self.mode]
        self.scaler = torch.amp.GradScaler(device.type) if self.mode == "fp16" else None
        self.in_weights_dtype = False

    def compute_in_weights_dtype(self) -> None:
        """For modules holding bf16 weights over fp32 masters (masters.py): they compute in their
        weights' dtype, without autocast. Autocast would run each norm in fp32 and cast its output
        back for the next layer: at batch 16+16 on an H100 the step took 14% longer that way
        (bench/RESULTS.md). PyTorch's bf16 norms still keep their statistics in fp32."""
        self.in_weights_dtype = True

    @property
    def frozen_dtype(self) -> torch.dtype:
        """For modules that are not trained (the VAE): they can live in the low-precision dtype."""
        return self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "no" or self.in_weights_dtype:
            return contextlib.nullcontext()
        # While a CUDA graph is captured, autocast's cache of cast weights would outlive the capture.
        capturing = self.device_type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=not capturing)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
             max_grad_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm, then step; returns the norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return grad_norm


def make_optimizer(parameters: list[torch.nn.Parameter] | list[dict], lr: float, *,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                   eight_bit: bool = False) -> torch.optim.Optimizer:
    """AdamW over `parameters` (tensors, or parameter groups as dicts); `eight_bit` is bitsandbytes'
    AdamW8bit, whose moments are 8-bit (the weights stay fp32)."""
    if eight_bit:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    tensors = [p for entry in parameters for p in (entry["params"] if isinstance(entry, dict) else [entry])]
    # The fused kernel is one launch for all parameters instead of several per tensor; capturable
    # keeps its step count on the GPU, so a CUDA graph can replay it (graphs.py).
    on_gpu = all(p.device.type == "cuda" for p in tensors)
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=on_gpu or None, capturable=on_gpu)


def train_step(models: DreamBoothModels, optimizer: torch.optim.Optimizer, precision: Precision,
               batch: Batch | list[Batch], prior_loss_weight: float, max_grad_norm: float, *,
               offset_noise: bool = False, snr_gamma: float | None = None) -> Loss:
    """One optimizer step on one batch of instance + class examples, or on micro-batches whose
    gradients add up (each loss divided by their number: the step their union would take; DDP
    all-reduces each one's, no no_sync, so it stays capturable). Gradients are left for the
    caller to clear (`optimizer.zero_grad`), so that a CUDA graph can capture the step whole."""
    micro_batches = batch if isinstance(batch, list) else [batch]
    losses = []
    for micro_batch in micro_batches:
        with precision.autocast():
            loss = dreambooth_loss(models, micro_batch, prior_loss_weight, offset_noise=offset_noise,
                                   snr_gamma=snr_gamma)
        precision.backward(loss.total / len(micro_batches) if len(micro_batches) > 1 else loss.total)
        losses.append(loss)
    if models.masters is not None:  # bf16 weights: the optimizer steps their fp32 masters
        models.masters.step(optimizer, max_grad_norm)
    else:
        precision.step(optimizer, models.trainable_parameters(), max_grad_norm)
    if len(losses) == 1:
        return Loss(loss.total.detach(), loss.instance.detach(), loss.prior.detach())
    return Loss(*(torch.stack([getattr(one, part) for one in losses]).mean().detach()
                  for part in ("total", "instance", "prior")))
