"""bf16 working weights over fp32 masters (--bf16_gradients).

With fp32 weights under autocast, every step casts each trained weight to bf16 for the forward
pass, casts its bf16 gradient back to fp32, and then all-reduces 4 bytes a weight. The trained
modules can hold bf16 copies of the weights instead: their gradients are then born bf16, and the
all-reduce moves half the bytes. They compute in bf16 without autocast, whose fp32 norms would
each cost a cast back (Precision.compute_in_weights_dtype). The optimizer keeps stepping fp32
masters, so updates too small for bf16 are never rounded away (training.Precision says why that
matters). Each step copies the clipped gradients into the masters' gradients, steps the masters,
and copies them back.

It costs 4 bytes a weight of GPU memory: the bf16 weights, plus fp32 gradient buffers, since
PyTorch's AdamW wants gradients in its parameters' dtype; from batch 4 up it saves more than that
in activations. bench/RESULTS.md has what it gains (with several GPUs, whose all-reduce it halves,
and at every batch size) and why batch 1 keeps fp32 weights by default.
"""

from __future__ import annotations

import torch


class MasterWeights:
    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        with torch.no_grad():
            self.masters = [parameter.detach().float().clone() for parameter in parameters]
            for parameter in parameters:
                parameter.data = parameter.data.to(torch.bfloat16)
        self._master_of = {id(parameter): master for parameter, master in zip(parameters, self.masters)}

    def masters_of(self, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The fp32 masters of `parameters`, for the optimizer's groups and for checkpoints."""
        return [self._master_of[id(parameter)] for parameter in parameters]

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """Clip the bf16 gradients' global norm, step the masters on them, and copy the masters
        back into the bf16 weights; returns the norm before clipping. The weights' gradients are
        dropped (the caller clears the optimizer's, the masters', as after any step)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_grad_norm)
        with torch.no_grad():
            pairs = [(master, parameter) for master, parameter in zip(self.masters, self.parameters)
                     if parameter.grad is not None]
            for master, _ in pairs:
                if master.grad is None:
                    master.grad = torch.empty_like(master)
            torch._foreach_copy_([master.grad for master, _ in pairs], [parameter.grad for _, parameter in pairs])
            for parameter in self.parameters:
                parameter.grad = None
        optimizer.step()
        self.push()
        return grad_norm

    def push(self) -> None:
        """Copy the masters into the bf16 weights (after a step, or a checkpoint's restore)."""
        with torch.no_grad():
            torch._foreach_copy_(self.parameters, self.masters)

    def write_back(self) -> None:
        """Make the masters the trained modules' weights again (fp32), for saving."""
        with torch.no_grad():
            for parameter, master in zip(self.parameters, self.masters):
                parameter.data = master


def train_bf16_weights(models, precision) -> None:
    """The trained modules of `models` (models/modules.DreamBoothModels) take bf16 weights over fp32
    masters, and compute in bf16 without `precision`'s autocast."""
    models.masters = MasterWeights(models.trainable_parameters())
    precision.compute_in_weights_dtype()
