"""Linear layers for decode steps on a CPU: few rows times a large weight, computed as `W·xᵀ`.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so it is bound
by reading the weights from memory. `F.linear` computes `x·Wᵀ`, and for a few rows the BLAS kernel
behind it reads the weights at about half the speed it manages for `W·xᵀ`, the same product laid out
with the weight as the left operand (measured here on 2 cores with weights not in cache, 8 rows:
4.4 against 9.8 GB/s for a 1536×576 layer, 34 against 16 ms for SmolLM2's 49k-row LM head). Within
`skinny_linears(model)`, every plain `nn.Linear` of the model takes that path for inputs of
`MIN_ROWS` to `MAX_ROWS` rows in fp32 on a CPU, and `F.linear` otherwise (prefill, training,
autocast, GPUs, and models small enough for their weights to stay in cache). The sums are the same
but accumulate in another order, so logits can differ in the last bits of fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Above this many rows the product is no longer bound by reading the weights and F.linear is as fast.
MAX_ROWS = 16
# One row is a matrix-vector product, which both layouts run alike; the swap measured slower there
# (6.1 against 6.8 tok/s for SmolLM2 at batch 1), so single rows keep F.linear.
MIN_ROWS = 2
# Below this many bytes of linear weights a model's decode step reads them from cache, where F.linear
# is faster (measured on the 2-layer test model: 0.85x); SmolLM2-135M has 540 MB.
MIN_WEIGHT_BYTES = 64 * 2**20


class SkinnyLinear(torch.nn.Linear):
    """`nn.Linear` computing few-row fp32 CPU inputs as `(W·xᵀ)ᵀ` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else MAX_ROWS + 1
        w = self.weight
        if (
            not MIN_ROWS <= rows <= MAX_ROWS
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        xt = x.reshape(rows, x.shape[-1]).t()
        y = torch.mm(w, xt) if self.bias is None else torch.addmm(self.bias[:, None], w, xt)
        return y.t().reshape(*x.shape[:-1], w.shape[0]).contiguous()


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run `model`'s plain linear layers as `SkinnyLinear` inside the block; yields how many.

    Only the class of each module changes (weights, hooks and wrappers such as peft's stay), and it is
    changed back on exit, so the model is untouched for training or for other code after the block.
    With `enabled=False` none is swapped: the benchmark measures the lever that way
    (`generate_batch(..., skinny=False)`, bench/generate_throughput.py).
    """
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear] if enabled else []
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    swapped = linears if size >= MIN_WEIGHT_BYTES else []
    for m in swapped:
        m.__class__ = SkinnyLinear
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__class__ = torch.nn.Linear
