"""Issue 5, target 4: SD 1.5's attention at a large batch, each kernel PyTorch has for it. The
UNet's self-attention over 64x64 latents has 8 heads of 40 channels, a head size no flash kernel
is built for (they run it as 64). Times forward and backward of `scaled_dot_product_attention`
at the UNet's shapes, per backend, and FlexAttention compiled; FLOPs counted with
torch.utils.flop_counter, against a bf16 matmul peak measured here. One JSON line per row.

    python bench/studies/attention.py [BATCH]      # BATCH images (default 64: 32+32 pairs)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: its shared helpers

import json  # noqa: E402

import torch
import torch.nn.functional as F
from common import matmul_peak
from mfu import timed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

DEVICE = torch.device("cuda")
# (name, query tokens, key tokens, head size): SD 1.5's self- and cross-attention per resolution.
SHAPES = (("self 64x64", 4096, 4096, 40), ("cross 64x64", 4096, 77, 40),
          ("self 32x32", 1024, 1024, 80), ("self 16x16", 256, 256, 160))
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch: int, queries: int, keys: int, head: int) -> list[torch.Tensor]:
    shapes = [(batch, 8, queries, head), (batch, 8, keys, head), (batch, 8, keys, head)]
    return [torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for shape in shapes]


def forward_backward(attention, tensors: list[torch.Tensor]):
    def run():
        for tensor in tensors:  # no gradient accumulation in the time
            tensor.grad = None
        out = attention(*tensors)
        out.backward(torch.ones_like(out))
    return run


def main(batch: int = 64) -> None:
    peak = matmul_peak()
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for name, queries, keys, head in SHAPES:
        tensors = inputs(batch, queries, keys, head)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            forward_backward(F.scaled_dot_product_attention, tensors)()
        flop = counter.get_total_flops()
        row = {"shape": name, "batch": batch, "head_size": head, "gflop": round(flop / 1e9, 1), "peak_tflops": round(peak)}
        kernels = {backend: (lambda q, k, v, b=kind: _with(b, q, k, v)) for backend, kind in BACKENDS.items()}
        kernels["flex (compiled)"] = flex
        for backend, attention in kernels.items():
            try:
                ms = timed(forward_backward(attention, tensors))
                row[backend] = {"ms": round(ms, 2), "tflops": round(flop / ms / 1e9, 1)}
            except Exception as error:  # a backend that does not take this shape (or fails to compile it)
                row[backend] = str(error).splitlines()[0][:100]
        print(json.dumps(row), flush=True)


def _with(kind: SDPBackend, q, k, v):
    with sdpa_kernel(kind):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
