"""Peak GPU memory and step time of full fine-tuning (also with a channels-last UNet: full-cl),
LoRA (issue 6) and the low-memory options (issue 8: --gradient_checkpointing --use_8bit_adam),
one configuration per fresh process so that peaks are clean: SD-1.5-sized random weights, 512 px,
UNet and text encoder trained, bf16 autocast, class latents cached, flash attention, as `raybooth
train` runs it: the step as a CUDA graph, eager with 8-bit Adam (which cannot be captured). Prints
one JSON line, with the last step's loss (the seed is fixed, so variants compare).

    python bench/memory.py MODEL_DIR full|full-cl|lora|lowmem PAIRS [STEPS]   # PAIRS: instance images per step (+ as many class)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import make_batch, seconds_per_step

from raybooth.models.loading import load_for_training, use_flash_attention
from raybooth.models.lora import add_adapters, save_adapters
from raybooth.train.graphs import GraphedStep
from raybooth.train.optim import enable_gradient_checkpointing, make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

DEVICE = torch.device("cuda")


def main(model_dir: str, variant: str, pairs: int, steps: int = 20) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)  # the same batch and noise in every process, so losses compare
    precision = Precision("bf16", DEVICE)
    lora = variant == "lora"
    models = load_for_training(Path(model_dir), DEVICE, DEVICE, precision.frozen_dtype, train_text_encoder=not lora)
    if lora:  # the base frozen in bf16, fp32 adapters on UNet and text encoder, as `--use_lora` trains
        models.unet.to(precision.frozen_dtype)
        add_adapters(models.unet, models.text_encoder, rank=4, alpha=4, lora_text_encoder=True)
        models = dataclasses.replace(models, train_text_encoder=True)
    if variant == "full-cl":
        models.unet.to(memory_format=torch.channels_last)
    use_flash_attention(DEVICE)  # as raybooth trains
    loaded_gib = round(torch.cuda.memory_allocated() / 2**30, 2)
    lowmem = variant == "lowmem"
    if lowmem:
        enable_gradient_checkpointing(models)
    parameters = models.trainable_parameters()
    optimizer = make_optimizer(parameters, lr=1e-4 if lora else 5e-6, eight_bit=lowmem)
    batch = make_batch(models, pairs, cached=True)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    def eager(b):
        loss = train_step(models, optimizer, precision, b, 1.0, 1.0)
        zero_grad()
        return loss

    step = eager if lowmem else GraphedStep(lambda b: train_step(models, optimizer, precision, b, 1.0, 1.0), zero_grad)
    try:
        seconds, loss = seconds_per_step(step, batch, steps)
    except torch.OutOfMemoryError:
        print(json.dumps(dict(variant=variant, pairs=pairs, out_of_memory=True)), flush=True)
        return
    row = dict(variant=variant, pairs=pairs, step_ms=round(seconds * 1e3, 1), images_per_s=round(2 * pairs / seconds, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loaded_gib=loaded_gib,
               reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
               trained_parameters_m=round(sum(p.numel() for p in parameters) / 1e6, 2), last_loss=round(loss, 5))
    if lora:
        with tempfile.TemporaryDirectory() as folder:
            row["adapter_mb"] = round(save_adapters(models.unet, models.text_encoder, Path(folder)).stat().st_size / 1e6, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:5]))
