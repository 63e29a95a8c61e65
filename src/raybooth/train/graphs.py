"""The training step as a CUDA graph. Eagerly, one DreamBooth step on an SD-1.5-sized model is
about 6,500 kernel launches, and the host cannot issue them as fast as an H100 runs them: the
GPU idles half of each step. Captured once, a step is one graph launch plus copying the batch in.

A step can be captured when its shapes never change, nothing in it waits on the GPU (`.item()`,
data-dependent shapes), the optimizer is `capturable`, and no GradScaler is involved (bf16, not
fp16). Random numbers (noise, timesteps) stay random: each replay advances the generator.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Generic, TypeVar

import torch

Inputs = TypeVar("Inputs")


Outputs = TypeVar("Outputs")


def _tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list):  # micro-batches of a step with gradient accumulation
        return [t for item in value for t in _tensors_of(item)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors_of(getattr(value, f.name))]
    return []


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(item, fn) for item in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)})
    return value


class GraphedStep(Generic[Inputs, Outputs]):
    """Call `step(inputs)` eagerly for `warmup_steps` calls (on a side stream, as capture
    requires), then capture it once and replay it for every later call.

    `step` must leave gradients in place; `zero_grad` clears them between eager calls. `inputs`
    and the outputs are tensors or dataclasses of tensors; each call's inputs are copied into
    the graph's own, and its outputs are copied out, so callers may keep them.
    """

    def __init__(self, step: Callable[[Inputs], Outputs], zero_grad: Callable[[], None], warmup_steps: int = 3,
                 stream: torch.cuda.Stream | None = None):
        self.step, self.zero_grad, self.warmup_steps = step, zero_grad, warmup_steps
        # One side stream for the warm-up and the capture: autograd keeps gradient accumulators
        # (and DDP its hooks) on the stream they were first used on.
        self.stream = stream or torch.cuda.Stream()
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: Inputs | None = None
        self.static_outputs: Outputs | None = None

    def __call__(self, inputs: Inputs) -> Outputs:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup_steps:
            return self._eager(inputs)
        if self.graph is None:
            self._capture(inputs)
        else:
            for static, new in zip(_tensors_of(self.static_inputs), _tensors_of(inputs)):
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return _map_tensors(self.static_outputs, torch.clone)

    def _eager(self, inputs: Inputs) -> Outputs:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            outputs = self.step(inputs)
            self.zero_grad()
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def _capture(self, inputs: Inputs) -> None:
        self.static_inputs = _map_tensors(inputs, torch.clone)
        self.zero_grad()  # gradients come to life inside the graph's memory pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.static_outputs = self.step(self.static_inputs)
