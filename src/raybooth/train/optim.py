"""What turns gradients into weights, beyond the step itself: the optimizer (AdamW, or Prodigy)
and its parameter groups, the learning-rate schedule, stopping the text encoder after N steps,
the EMA of the UNet, and the memory options (gradient checkpointing, 8-bit Adam, prompts encoded
once).

A CUDA graph replays the optimizer step with the values it captured, so whatever changes from
step to step lives in tensors the graph reads: each group's learning rate and the text encoder's
gradient gate are 0-dim tensors, filled in place between replays."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import dataclass

import torch

from raybooth.config.optimization import PRODIGY_INSTALL
from raybooth.errors import RayboothError


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


EIGHT_BIT_INSTALL = "pip install 'raybooth[8bit]'"


def make_prodigy(groups: list[dict], lr: float, cfg) -> torch.optim.Optimizer:
    """prodigyopt's Prodigy with the --prodigy_* settings and AdamW's betas, epsilon and weight
    decay, as diffusers' train_dreambooth_lora_sdxl.py builds it. A group's own weight_decay (the
    text encoders') stands, as in AdamW."""
    try:
        from prodigyopt import Prodigy
    except ImportError:  # the driver checked its own machine (config/optimization.py); a worker's may lack it
        raise RayboothError(f"--optimizer prodigy needs prodigyopt on every worker: {PRODIGY_INSTALL}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # its "Using decoupled weight decay" print, on every worker
        return Prodigy(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), beta3=cfg.prodigy_beta3,
                       eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay, decouple=cfg.prodigy_decouple,
                       use_bias_correction=cfg.prodigy_use_bias_correction,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup)


def learning_rates(cfg, world_size: int) -> tuple[float, float]:
    """(UNet's, text encoder's) peak learning rate. --scale_lr scales --lr by the examples one
    optimizer step sees over all workers, as diffusers does; --text_encoder_lr stays as given.
    Prodigy takes one rate for all its groups (config/optimization.py refuses another one)."""
    lr = cfg.learning_rate()
    if cfg.scale_lr:
        lr *= cfg.train_batch_size * cfg.gradient_accumulation_steps * world_size
    if cfg.optimizer == "prodigy":
        return lr, lr
    return lr, cfg.text_encoder_lr if cfg.text_encoder_lr is not None else lr


def graph_blocker(cfg) -> str | None:
    """Why the options rule out capturing the step as a CUDA graph, or None. (Gradient
    checkpointing, accumulation, schedules, the EMA and the text encoder's stop replay exactly as
    the eager step runs: tests/gpu/options_check.py.)"""
    if cfg.optimizer == "prodigy":
        return "--optimizer prodigy (Prodigy reads its step-size estimate back to the host each step)"
    if cfg.use_8bit_adam:
        return "--use_8bit_adam (bitsandbytes keeps its step count on the host)"
    if cfg.text_encoder_lr is not None and cfg.trains_text_encoder:
        # On an H200 (torch 2.11) the replayed step drifted from the eager one with two different
        # nonzero rates, though one of a schedule, or a rate dropping to 0, replays exactly.
        return "--text_encoder_lr (a captured step with two rates did not match the eager step on GPU)"
    return None


def check_8bit_adam(on_gpu: bool) -> None:
    """One clear line where --use_8bit_adam cannot run: no bitsandbytes, or on the CPU one whose
    8-bit AdamW has no CPU kernel (older releases; 0.50 has one). Tried on a small tensor."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RayboothError(f"--use_8bit_adam needs bitsandbytes, which is not installed: {EIGHT_BIT_INSTALL}")
    if on_gpu:
        return
    try:  # a tensor at the size where bitsandbytes starts keeping 8-bit state
        parameter = torch.nn.Parameter(torch.zeros(4096))
        parameter.grad = torch.ones_like(parameter)

        make_optimizer([parameter], 1e-3, eight_bit=True).step()
    except Exception as error:  # whatever the library raises for a missing kernel
        import bitsandbytes

        raise RayboothError(f"--use_8bit_adam: bitsandbytes {bitsandbytes.__version__} cannot run 8-bit AdamW on "
                            f"the CPU ({type(error).__name__}); train on GPUs or upgrade: {EIGHT_BIT_INSTALL}") from None


def enable_gradient_checkpointing(models) -> None:
    models.unet.enable_gradient_checkpointing()
    if models.train_text_encoder:
        for encoder in models.text_encoders().values():
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def precompute_prompt_embeddings(models, prompt_ids: torch.Tensor,
                                 precision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen text encoders' output for the training prompts (hidden states, and SDXL's pooled
    embedding), computed once as each step would compute it; the encoders are then dropped from
    the models (generation loads them again)."""
    with torch.no_grad(), precision.autocast():
        embeddings, pooled = models.encode_prompts(prompt_ids)
    models.text_encoder = models.text_encoder_2 = None
    if embeddings.device.type == "cuda":
        torch.cuda.empty_cache()
    return embeddings, pooled


def ema_parameters(models) -> list[torch.nn.Parameter]:
    from raybooth.models.modules import unwrap

    return [p for p in unwrap(models.unet).parameters() if p.requires_grad]


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    models: object  # DreamBoothModels
    ema: object | None = None  # diffusers EMAModel of the UNet's trained parameters
    text_encoder_group: int | None = None  # index of the text encoder's parameter group
    text_encoder_steps: int | None = None
    lr_tensors: list[torch.Tensor] | None = None  # what a CUDA graph reads as each group's rate

    @property
    def steps_taken(self) -> int:
        return self.scheduler.last_epoch

    def trains_text_encoder(self, step: int) -> bool:
        return self.text_encoder_steps is None or step < self.text_encoder_steps

    def learning_rates(self) -> list[float]:
        """Each group's rate for the next step: the schedule's (LambdaLR's own formula, on the host,
        so no step waits on the GPU), 0 for a text encoder that has stopped training."""
        step = self.steps_taken
        rates = [base * schedule(step) for base, schedule in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        if self.text_encoder_group is not None and not self.trains_text_encoder(step):
            rates[self.text_encoder_group] = 0.0
        return rates

    def apply(self) -> None:
        """Write the next step's rates and gate into the optimizer and the models. Writing the
        tensors in place (never assigning new ones) is what keeps a captured graph in step."""
        for index, (group, rate) in enumerate(zip(self.optimizer.param_groups, self.learning_rates())):
            if self.lr_tensors is None:
                group["lr"] = rate
            else:
                self.lr_tensors[index].fill_(rate)
                group["lr"] = self.lr_tensors[index]
        if self.models.text_encoder_gate is not None:
            self.models.text_encoder_gate.fill_(float(self.trains_text_encoder(self.steps_taken)))

    def after_step(self) -> None:
        """Once per optimizer step, after it (outside a CUDA graph)."""
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(ema_parameters(self.models))
        self.apply()

    def finish(self) -> None:
        """Before saving: the UNet takes the EMA weights (with --use_ema), the modules their fp32
        masters (with --bf16_gradients)."""
        if self.ema is not None:
            self.ema.copy_to(ema_parameters(self.models))
        if self.models.masters is not None:
            self.models.masters.write_back()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if "scheduler" not in state:
            raise RayboothError("the checkpoint comes from an older raybooth; pass --resume_from_checkpoint none "
                                "to start over")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.shadow_params = [p.to(self.models.device) for p in self.ema.shadow_params]
        self.apply()  # the loaded groups hold copies of the rates, not the tensors a graph reads


def build_optimization(models, cfg, total_steps: int, world_size: int = 1, lr_as_tensor: bool = False) -> Optimization:
    """The optimizer over the models' trained parameters (UNet, and text encoder as a group of its
    own), the schedule over `total_steps` optimizer steps, and the EMA. `lr_as_tensor` for a step
    that a CUDA graph captures."""
    from diffusers.optimization import get_scheduler

    unet_lr, text_encoder_lr = learning_rates(cfg, world_size)

    def stepped(module) -> list[torch.Tensor]:  # its trained parameters, or with --bf16_gradients their masters
        parameters = [p for p in module.parameters() if p.requires_grad]
        return parameters if models.masters is None else models.masters.masters_of(parameters)

    groups = [{"params": stepped(models.unet), "lr": unet_lr}]
    text_encoder_group = None
    if models.train_text_encoder:
        text_encoder_group = len(groups)
        groups.append({"params": [p for encoder in models.text_encoders().values() for p in stepped(encoder)],
                       "lr": text_encoder_lr, "weight_decay": cfg.text_encoder_weight_decay()})
        if cfg.train_text_encoder_steps is not None:
            models.text_encoder_gate = torch.ones((), device=models.text_encoder_device)
    optimizer = make_optimizer_for(groups, unet_lr, cfg)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(ema_parameters(models), foreach=True)
    lr_tensors = None
    if lr_as_tensor:
        lr_tensors = [torch.zeros((), device=group["params"][0].device) for group in optimizer.param_groups]
    optimization = Optimization(optimizer, scheduler, models, ema, text_encoder_group, cfg.train_text_encoder_steps,
                                lr_tensors)
    optimization.apply()
    return optimization


def make_optimizer_for(groups: list[dict], lr: float, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "prodigy":
        return make_prodigy(groups, lr, cfg)
    return make_optimizer(groups, lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                          weight_decay=cfg.adam_weight_decay, eight_bit=cfg.use_8bit_adam)
