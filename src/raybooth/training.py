"""DreamBooth's training step in plain PyTorch: the prior-preserving diffusion loss, and the
precision policy around it. Nothing here knows about Ray; `trainer.py` runs it on workers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from raybooth.models import half_precision_dtype


@dataclass
class DreamBoothModels:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # diffusers DDPMScheduler
    train_text_encoder: bool

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def text_encoder_device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + ([self.text_encoder] if self.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def data_parallel(self) -> DreamBoothModels:
        """The trained modules wrapped in DDP, each on its own device (the UNet and the text
        encoder may sit on two GPUs of one worker)."""
        def wrap(module: torch.nn.Module) -> DistributedDataParallel:
            device = next(module.parameters()).device
            return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

        return replace(self, unet=wrap(self.unet),
                       text_encoder=wrap(self.text_encoder) if self.train_text_encoder else self.text_encoder)

    def encode_prompts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden_states = self.text_encoder(prompt_ids.to(self.text_encoder_device))[0]
        return hidden_states.to(self.device)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


@dataclass
class Loss:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, prior_loss_weight: float) -> Loss:
    """MSE on the instance half of the batch plus `prior_loss_weight` times MSE on the class half."""
    prediction_instance, prediction_prior = prediction.float().chunk(2)
    target_instance, target_prior = target.float().chunk(2)
    instance = F.mse_loss(prediction_instance, target_instance)
    prior = F.mse_loss(prediction_prior, target_prior)
    return Loss(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (SD 1.x), or the velocity (SD 2.x 768)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def dreambooth_loss(models: DreamBoothModels, pixels: torch.Tensor, prompt_ids: torch.Tensor,
                    prior_loss_weight: float) -> Loss:
    """`pixels` holds the instance images then the class images; `prompt_ids` matches row for row."""
    with torch.no_grad():
        latent_dist = models.vae.encode(pixels.to(models.device, models.vae.dtype)).latent_dist
        latents = latent_dist.sample().float() * models.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = models.unet(noisy_latents, timesteps, models.encode_prompts(prompt_ids)).sample
    target = diffusion_target(models.noise_scheduler, latents, noise, timesteps)
    return prior_preservation_loss(prediction, target, prior_loss_weight)


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
    far below half a bf16 ulp of a typical weight and rounds away. fp32 masters keep them.
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = resolve_precision(mode, device)
        self.device_type = device.type
        self.dtype = _DTYPES[self.mode]
        self.scaler = torch.amp.GradScaler(device.type) if self.mode == "fp16" else None

    @property
    def frozen_dtype(self) -> torch.dtype:
        """For modules that are not trained (the VAE): they can live in the low-precision dtype."""
        return self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

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


def make_optimizer(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters instead of several per tensor: on GPU
    # a DreamBooth step is launch-bound, not compute-bound.
    fused = all(p.device.type == "cuda" for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, fused=fused or None)


def train_step(models: DreamBoothModels, optimizer: torch.optim.Optimizer, precision: Precision,
               pixels: torch.Tensor, prompt_ids: torch.Tensor, prior_loss_weight: float,
               max_grad_norm: float) -> Loss:
    """One optimizer step on one batch of instance + class examples."""
    with precision.autocast():
        loss = dreambooth_loss(models, pixels, prompt_ids, prior_loss_weight)
    precision.backward(loss.total)
    precision.step(optimizer, models.trainable_parameters(), max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return Loss(loss.total.detach(), loss.instance.detach(), loss.prior.detach())
