"""What the worker switches on at set-up where a flag is left at its default: bf16 weights over
fp32 masters, a channels-last UNet, cuDNN's attention. Each default is where it was measured
faster (bench/RESULTS.md, its Decisions); the flag, when given, wins. Decided on the worker, which
knows its device and how many workers there are."""

from __future__ import annotations

from raybooth.config import TrainConfig
from raybooth.errors import RayboothError


def uses_bf16_gradients(cfg: TrainConfig, precision: str, world_size: int) -> bool:
    """As --bf16_gradients says. By default with several one-GPU workers, or at batch 4 and up,
    where it was measured faster and smaller (bench/RESULTS.md; at batch 1 it costs 3 GiB more);
    only in bf16 mixed precision, with no option that rules it out, and without gradient
    accumulation (whose sum would be taken in bf16)."""
    if cfg.bf16_gradients and precision != "bf16":
        raise RayboothError(f"--bf16_gradients needs bf16 mixed precision; this worker's is {precision}")
    if cfg.bf16_gradients is not None:
        return cfg.bf16_gradients
    return ((world_size > 1 or cfg.train_batch_size >= 4) and precision == "bf16"
            and cfg.bf16_gradients_blocker() is None
            and cfg.gradient_accumulation_steps == 1 and cfg.gpus_per_worker == 1)


def uses_channels_last(cfg: TrainConfig, device_type: str, world_size: int) -> bool:
    """As --channels_last says, else where it was measured faster (bench/RESULTS.md): one GPU
    worker, batch 1, full fine-tuning (LoRA, DDP and --compile were not measured with it)."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    return (device_type == "cuda" and world_size == 1 and cfg.train_batch_size == 1 and not cfg.use_lora
            and not cfg.compile)


def uses_cudnn_attention(cfg: TrainConfig, device_type: str) -> bool:
    """As --cudnn_attention says, else on GPUs at batch 4 and up or with --compile, where the
    attention's share of a step makes up for the plans cuDNN builds first (bench/RESULTS.md)."""
    if cfg.cudnn_attention is not None:
        return cfg.cudnn_attention
    return device_type == "cuda" and (cfg.train_batch_size >= 4 or cfg.compile)
