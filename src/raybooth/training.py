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

    def data_parallel(self, stream: torch.cuda.Stream | None = None) -> DreamBoothModels:
        """The trained modules wrapped in DDP, each on its own device (the UNet and the text
        encoder may sit on two GPUs of one worker). A CUDA graph that is to capture DDP's
        all-reduce asks for DDP to be built on the stream it captures on: `stream`."""
        def wrap(module: torch.nn.Module) -> DistributedDataParallel:
            device = next(module.parameters()).device
            if device.type != "cuda":
                return DistributedDataParallel(module)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return DistributedDataParallel(module, device_ids=[device])

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


@dataclass
class Batch:
    """One step's examples, instance rows first, then class rows; `prompt_ids` matches row for row.
    Class images whose VAE latents were computed once come as that latent distribution (mean,
    std) instead of pixels: they are at the training resolution already, so encoding them each
    step would give the same distribution again."""

    pixels: torch.Tensor  # images to encode this step, in [-1, 1]: the instance crops (and class crops)
    prompt_ids: torch.Tensor
    class_latent_mean: torch.Tensor | None = None
    class_latent_std: torch.Tensor | None = None


def latent_distribution(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for `pixels`, unscaled, in fp32."""
    latent_dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return latent_dist.mean.float(), latent_dist.std.float()


def sample_latents(models: DreamBoothModels, batch: Batch) -> torch.Tensor:
    """Scaled latents of every row: one fresh draw from each image's latent distribution, cached
    or encoded now, with one call for the noise, so both ways consume the same random numbers."""
    with torch.no_grad():
        mean, std = latent_distribution(models.vae, batch.pixels)
        if batch.class_latent_mean is not None:
            mean, std = torch.cat([mean, batch.class_latent_mean]), torch.cat([std, batch.class_latent_std])
        latents = mean + std * torch.randn_like(std)
    return latents * models.vae.config.scaling_factor


def dreambooth_loss(models: DreamBoothModels, batch: Batch, prior_loss_weight: float) -> Loss:
    latents = sample_latents(models, batch)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = models.unet(noisy_latents, timesteps, models.encode_prompts(batch.prompt_ids)).sample
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


def make_optimizer(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters instead of several per tensor; capturable
    # keeps its step count on the GPU, so a CUDA graph can replay it (graphs.py).
    on_gpu = all(p.device.type == "cuda" for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, fused=on_gpu or None, capturable=on_gpu)


def train_step(models: DreamBoothModels, optimizer: torch.optim.Optimizer, precision: Precision, batch: Batch,
               prior_loss_weight: float, max_grad_norm: float) -> Loss:
    """One optimizer step on one batch of instance + class examples. Gradients are left for the
    caller to clear (`optimizer.zero_grad`), so that a CUDA graph can capture the step whole."""
    with precision.autocast():
        loss = dreambooth_loss(models, batch, prior_loss_weight)
    precision.backward(loss.total)
    precision.step(optimizer, models.trainable_parameters(), max_grad_norm)
    return Loss(loss.total.detach(), loss.instance.detach(), loss.prior.detach())
