"""The two pretraining stages: the VAE on pixels, then UNet and text encoder together on
(latent, caption) pairs. Each stage ends at its step count or its time budget, whichever comes
first, and its learning rate decays over whichever of the two it is nearer to using up."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from raybooth.world.pretraining_data import CaptionTable, to_pixels

Log = Callable[[str], None]


@dataclass
class StageSettings:
    steps: int
    batch_size: int
    learning_rate: float
    time_budget_s: float
    warmup_steps: int = 200
    log_every: int = 100


class Progress:
    """How far a stage is, as the larger of steps done and time spent; drives LR and stopping."""

    def __init__(self, settings: StageSettings):
        self.settings = settings
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fraction(self, step: int) -> float:
        return max(step / self.settings.steps, self.elapsed / max(self.settings.time_budget_s, 1e-9))

    def learning_rate(self, step: int) -> float:
        """Linear warmup, then cosine decay to a tenth, over the stage's progress."""
        warmup = min(1.0, (step + 1) / max(1, min(self.settings.warmup_steps, self.settings.steps // 4)))
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, self.fraction(step))))
        return self.settings.learning_rate * warmup * cosine


class EMA:
    """An exponential moving average of a module's weights; the averaged copy is what ships."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.average = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # early on, follow the fast-moving weights
        averaged = list(self.average.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in module.parameters()], 1 - decay)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the speed); full precision elsewhere (CPU autocast is slow)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def optimizer_for(parameters: list[torch.nn.Parameter], settings: StageSettings, device: torch.device):
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, betas=(0.9, 0.99), weight_decay=0.01,
                             fused=device.type == "cuda")


def run_stage(name: str, settings: StageSettings, parameters: list[torch.nn.Parameter], device: torch.device,
              loss_of_batch: Callable[[], dict[str, torch.Tensor]], log: Log,
              after_step: Callable[[int], None] = lambda step: None) -> dict:
    """The shared loop: AdamW, LR by progress, gradient clipping, loss lines with flush."""
    optimizer = optimizer_for(parameters, settings, device)
    progress = Progress(settings)
    totals: dict[str, float] = {}
    step, last_log = 0, progress.elapsed
    while step < settings.steps and progress.elapsed < settings.time_budget_s:
        for group in optimizer.param_groups:
            group["lr"] = progress.learning_rate(step)
        losses = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        after_step(step)
        if step % settings.log_every == 0 or step in (1, settings.steps) or progress.elapsed - last_log > 30:
            last_log = progress.elapsed
            totals = {key: float(value.detach()) for key, value in losses.items()}  # syncs only when logging
            shown = " ".join(f"{key} {value:.4f}" for key, value in totals.items())
            log(f"{name} step {step}/{settings.steps} {shown} lr {progress.learning_rate(step):.2e} "
                f"elapsed {progress.elapsed:.0f}s")
    if step:
        totals = {key: float(value.detach()) for key, value in losses.items()}  # the last step's, for the record
    log(f"{name} done: {step} steps in {progress.elapsed:.0f}s, " + " ".join(f"{k} {v:.4f}" for k, v in totals.items()))
    return dict(steps=step, seconds=round(progress.elapsed, 1), **{f"final_{k}": round(v, 5) for k, v in totals.items()})


def train_vae(vae: torch.nn.Module, images: torch.Tensor, settings: StageSettings, kl_weight: float,
              device: torch.device, log: Log, generator: torch.Generator) -> dict:
    """Reconstruction (L1 + MSE, in [-1, 1]) plus a small KL term per latent number, which keeps
    the latents near a smooth, bounded range that diffusion handles well."""
    vae.to(device).train()

    def loss_of_batch() -> dict[str, torch.Tensor]:
        index = torch.randint(len(images), (settings.batch_size,), device=images.device, generator=generator)
        pixels = to_pixels(images[index].to(device, non_blocking=True))
        with autocast(device):
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
        l1, mse = F.l1_loss(reconstruction, pixels), F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return dict(loss=l1 + mse + kl_weight * kl, l1=l1.detach(), mse=mse.detach(), kl=kl.detach())

    record = run_stage("vae", settings, list(vae.parameters()), device, loss_of_batch, log)
    vae.eval()
    return record


@torch.no_grad()
def encode_all(vae: torch.nn.Module, images: torch.Tensor, device: torch.device,
               batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latent (mean, std) of every image, in fp32 on `device`."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            posterior = vae.encode(to_pixels(images[start:start + batch_size].to(device))).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def unit_variance_scale(means: torch.Tensor, stds: torch.Tensor, generator: torch.Generator) -> float:
    """SD's scaling_factor: 1 / the standard deviation of sampled latents."""
    noise = torch.randn(means.shape, device=means.device, generator=generator)
    return float(1.0 / (means + stds * noise).std())


@dataclass
class DenoiserParts:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler


def train_denoiser(parts: DenoiserParts, means: torch.Tensor, stds: torch.Tensor, scale: float,
                   captions: CaptionTable, settings: StageSettings, ema_decay: float, device: torch.device,
                   log: Log, generator: torch.Generator) -> tuple[DenoiserParts, dict]:
    """SD's objective: predict the noise added to a scaled latent at a uniform random timestep,
    given the caption's last hidden states. Returns the EMA weights (or the trained ones when
    `ema_decay` is 0) and the stage's record."""
    unet, text_encoder = parts.unet.to(device).train(), parts.text_encoder.to(device).train()
    averages = [EMA(unet, ema_decay), EMA(text_encoder, ema_decay)] if ema_decay > 0 else []
    scheduler = parts.noise_scheduler
    steps_total = scheduler.config.num_train_timesteps

    def loss_of_batch() -> dict[str, torch.Tensor]:
        index = torch.randint(len(means), (settings.batch_size,), device=device, generator=generator)
        noise_in_latent = torch.randn(means[index].shape, device=device, generator=generator)
        latents = (means[index] + stds[index] * noise_in_latent) * scale
        noise = torch.randn(latents.shape, device=device, generator=generator)
        timesteps = torch.randint(steps_total, (settings.batch_size,), device=device, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        token_ids = captions.sample(index, generator)
        with autocast(device):
            prediction = unet(noisy, timesteps, text_encoder(token_ids)[0]).sample
        loss = F.mse_loss(prediction.float(), noise)
        return dict(loss=loss)

    def after_step(step: int) -> None:
        for average, module in zip(averages, (unet, text_encoder)):
            average.update(module, step)

    parameters = [*unet.parameters(), *text_encoder.parameters()]
    record = run_stage("unet", settings, parameters, device, loss_of_batch, log, after_step)
    if averages:
        unet, text_encoder = averages[0].average, averages[1].average
    return DenoiserParts(unet.eval(), text_encoder.eval(), scheduler), record
