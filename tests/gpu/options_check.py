"""GPU checks of issue 8's training options that CI (CPU only) cannot make: under a CUDA graph, a
learning-rate schedule with warm-up, gradient accumulation, --train_text_encoder_steps and the EMA
and gradient checkpointing give the eager step's losses and weights; a second learning rate
(--text_encoder_lr), which drifted; 8-bit Adam with gradient checkpointing (eager, as the worker
runs it).

    python tests/gpu/options_check.py MODEL_DIR     # MODEL_DIR: e.g. a `raybooth tiny-model` folder
"""

import sys
import traceback

import torch

from raybooth.config import TrainConfig
from raybooth.models.loading import load_for_training, load_tokenizer, tokenize
from raybooth.train.loss import Batch
from raybooth.train.optim import build_optimization, enable_gradient_checkpointing
from raybooth.train.precision import Precision
from raybooth.train.step import make_step

model_dir = sys.argv[1]
cuda = torch.device("cuda")
ids = torch.from_numpy(tokenize(load_tokenizer(model_dir), "a photo of unqtkn toy car")).repeat(2, 1).to(cuda)
generator = torch.Generator(device=cuda).manual_seed(0)
batches = [Batch(torch.rand(2, 3, 64, 64, device=cuda, generator=generator) * 2 - 1, ids) for _ in range(4)]


def config(**options) -> TrainConfig:
    return TrainConfig(model_dir=model_dir, output_dir="o", instance_images_dir="i", instance_prompt="p",
                       class_images_dir="c", class_prompt="q", lr=1e-3, **options)


def run(options: dict, graph: bool, steps: int = 10, checkpointing: bool = False):
    torch.manual_seed(0)
    cfg = config(**options)
    precision = Precision("bf16", cuda)
    models = load_for_training(model_dir, cuda, cuda, precision.frozen_dtype, True)
    if checkpointing:
        enable_gradient_checkpointing(models)
    optimization = build_optimization(models, cfg, steps, lr_as_tensor=graph)
    step = make_step(models, optimization.optimizer, precision, cfg, torch.cuda.Stream() if graph else None, 1)
    losses, rates = [], []
    for index in range(steps):
        accumulation = cfg.gradient_accumulation_steps
        inputs = (batches[index % 4] if accumulation == 1 else
                  [batches[(accumulation * index + k) % 4] for k in range(accumulation)])
        rates.append(round(float(optimization.optimizer.param_groups[-1]["lr"]), 8))
        losses.append(step(inputs).total.item())
        optimization.after_step()
    optimization.finish()
    weights = torch.cat([p.detach().float().flatten() for p in models.trainable_parameters()])
    return losses, weights, rates


def compare(name: str, options: dict, **kwargs) -> None:
    try:
        eager_losses, eager_weights, eager_rates = run(options, graph=False, **kwargs)
        graph_losses, graph_weights, graph_rates = run(options, graph=True, **kwargs)
        same_losses = torch.allclose(torch.tensor(eager_losses), torch.tensor(graph_losses), rtol=2e-2)
        print(f"{name}: graph matches eager: losses {same_losses}, rates {eager_rates == graph_rates} "
              f"({graph_rates}), max weight difference {(eager_weights - graph_weights).abs().max().item():.2e}",
              flush=True)
    except Exception:
        print(f"{name}: FAILED\n{traceback.format_exc(limit=3)}", flush=True)


def main() -> None:
    compare("plain", {})
    compare("cosine schedule, warm-up 3", {"lr_scheduler": "cosine", "lr_warmup_steps": 3})
    compare("accumulation 2", {"gradient_accumulation_steps": 2})
    compare("text encoder stops after 4 (its rate shown)", {"train_text_encoder_steps": 4})
    # Drifted from the eager step on an H200 with torch 2.11 (why is open): the worker runs it eagerly.
    compare("text_encoder_lr 5e-4 beside lr 1e-3 (its rate shown)", {"text_encoder_lr": 5e-4})
    compare("ema", {"use_ema": True})
    compare("gradient checkpointing", {}, checkpointing=True)
    try:
        losses, _, _ = run({"use_8bit_adam": True}, graph=False, checkpointing=True)
        print(f"8-bit Adam + gradient checkpointing, eager: losses {[round(v, 4) for v in losses]}", flush=True)
    except Exception:
        print(f"8-bit Adam: FAILED\n{traceback.format_exc(limit=3)}", flush=True)


if __name__ == "__main__":
    main()
