"""GPU checks that CI (CPU only) cannot make: the cross-device step of --gpus_per_worker 2 (text
encoder on another device than the UNet), and bf16/fp16 steps on CUDA with fused AdamW.

    python bench/gpu_check.py MODEL_DIR     # MODEL_DIR: e.g. a `raybooth tiny-model` folder
"""

import sys

import torch

from raybooth.data import tokenize
from raybooth.models import load_for_training, load_tokenizer
from raybooth.training import Precision, make_optimizer, train_step

model_dir = sys.argv[1]
cuda, cpu = torch.device("cuda"), torch.device("cpu")
ids = tokenize(load_tokenizer(model_dir), "a photo of unqtkn toy car")
prompt_ids = torch.from_numpy(ids).repeat(4, 1)
pixels = torch.rand(4, 3, 64, 64) * 2 - 1
for mode, text_device in [("bf16", cuda), ("fp16", cuda), ("bf16", cpu)]:
    precision = Precision(mode, cuda)
    models = load_for_training(model_dir, cuda, text_device, precision.frozen_dtype, train_text_encoder=True)
    optimizer = make_optimizer(models.trainable_parameters(), lr=1e-4)
    before = models.text_encoder.get_input_embeddings().weight.detach().clone()
    losses = [train_step(models, optimizer, precision, pixels.to(cuda), prompt_ids, 1.0, 1.0).total.item()
              for _ in range(5)]
    moved = not torch.equal(before, models.text_encoder.get_input_embeddings().weight.detach())
    print(f"{mode} text encoder on {text_device}: losses {[round(v, 4) for v in losses]}, "
          f"text encoder trained: {moved}, fused AdamW: {optimizer.defaults.get('fused')}", flush=True)
