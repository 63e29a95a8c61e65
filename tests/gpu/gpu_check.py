"""GPU checks that CI (CPU only) cannot make: the CUDA-graph step gives the eager step's losses
and weights, bf16 and fp16 steps run with fused AdamW, and the cross-device step of
--gpus_per_worker 2 (text encoder on another device than the UNet) trains.

    python tests/gpu/gpu_check.py MODEL_DIR     # MODEL_DIR: e.g. a `raybooth tiny-model` folder
"""

import sys

import torch

from raybooth.models.loading import load_for_training, load_tokenizer, tokenize
from raybooth.train.graphs import GraphedStep
from raybooth.train.loss import Batch
from raybooth.train.optim import make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

model_dir = sys.argv[1]
cuda, cpu = torch.device("cuda"), torch.device("cpu")
ids = tokenize(load_tokenizer(model_dir), "a photo of unqtkn toy car")
batch = Batch(torch.rand(4, 3, 64, 64, device=cuda) * 2 - 1, torch.from_numpy(ids).repeat(4, 1).to(cuda))


def run(mode, text_device, graph, steps=8):
    torch.manual_seed(0)
    precision = Precision(mode, cuda)
    models = load_for_training(model_dir, cuda, text_device, precision.frozen_dtype, train_text_encoder=True)
    optimizer = make_optimizer(models.trainable_parameters(), lr=1e-4)
    before = models.text_encoder.get_input_embeddings().weight.detach().clone()

    def step(b):
        return train_step(models, optimizer, precision, b, 1.0, 1.0)

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    stepper = GraphedStep(step, zero_grad) if graph else (lambda b: (step(b), zero_grad())[0])
    losses = [stepper(batch).total.item() for _ in range(steps)]
    moved = not torch.equal(before, models.text_encoder.get_input_embeddings().weight.detach())
    print(f"{mode} text encoder on {text_device}, graph {graph}: losses {[round(v, 4) for v in losses]}, "
          f"text encoder trained: {moved}", flush=True)
    return losses, models.unet.conv_in.weight.detach().clone()


eager_losses, eager_weight = run("bf16", cuda, graph=False)
graph_losses, graph_weight = run("bf16", cuda, graph=True)
# The same seed draws the same noise and timesteps eagerly and in the graph.
print("graph matches eager:", torch.allclose(torch.tensor(eager_losses), torch.tensor(graph_losses), rtol=2e-2),
      "max weight difference:", (eager_weight - graph_weight).abs().max().item(), flush=True)
run("fp16", cuda, graph=False)
run("bf16", cpu, graph=False)
