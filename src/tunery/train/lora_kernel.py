"""LoRA linear layers as one autograd node: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with fused accumulation.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(x)) * s`: the update is written out at the
full output size, scaled in a second pass and added in a third, and backward repeats those passes
(scale the gradient, then sum the two gradients of `x`). On a CPU those passes over [tokens, out]
tensors cost as much as the rank-16 matmuls themselves. Here the update is accumulated into the
base output by the GEMM itself (`addmm_` with `alpha=s`), and the input gradient `g·W + s·(g·B)·A`
likewise, so no full-size temporary is made. The parameters, their names and the saved adapter are
peft's own; only the forward of plain, single-adapter, frozen-base layers is replaced, and any
other case (DoRA, dropout while training, merged or disabled adapters, several adapters, a
quantized base) takes peft's path unchanged. tests/test_lora_kernel.py checks outputs and every
gradient against peft.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype):
        # Casts are explicit (autocast does not reach into a Function's in-place ops): `dtype` is
        # the autocast dtype, or the input's own when autocast is off.
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            u = x2 @ a.t()  # [tokens, r]
            y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            y.addmm_(u, b.t(), alpha=scaling)
        # A weight cast for autocast (an fp32 base under bf16) is cast again in backward rather
        # than kept from forward to backward: keeping it would hold a 2-byte copy of every frozen
        # weight. A base already in the compute dtype is saved as itself, with no copy at all.
        ctx.recast = w is not weight
        ctx.save_for_backward(x2, weight if ctx.recast else w, a, b, u)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, u = ctx.saved_tensors
        if ctx.recast:
            w = w.to(x2.dtype)
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            gu = g @ b  # gradient of u, before the scale
            gx = (g @ w).addmm_(gu, a, alpha=s).view(*grad.shape[:-1], -1) if need_x else None
            gw = g.t() @ x2 if need_w else None
            gbias = g.sum(0) if need_bias and ctx.has_bias else None
            ga = (gu.t() @ x2).mul_(s) if need_a else None
            gb = (g.t() @ u).mul_(s) if need_b else None
        return gx, gw, gbias, ga, gb, None, None


def _fused_adapter(layer) -> str | None:
    """The one adapter this layer can run fused right now, or None for peft's own path."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    drop = layer.lora_dropout[name]
    if drop.training and not isinstance(drop, torch.nn.Identity) and drop.p > 0:
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if layer.lora_B[name].bias is not None:
        return None
    return name


class FusedLoraLinear(Linear):
    """peft's LoRA `Linear` with the fused forward where it applies (`fuse_lora_layers`)."""

    # False takes peft's path always: the benchmark measures the lever this way
    # (bench/train_throughput.py, `tunery-unfused`; train/levers.py).
    fuse = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fused_adapter(self) if self.fuse and not args and not kwargs else None
        if name is not None:
            base = self.get_base_layer()
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            dev = x.device.type
            if torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
            elif x.dtype == a.dtype == base.weight.dtype:
                dtype = x.dtype
            else:  # peft casts the input to the adapter's dtype; leave that to it
                name = None
        if name is None:
            return super().forward(x, *args, **kwargs)
        return _LoraLinearFn.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]), dtype)


def fuse_lora_layers(model: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every plain peft LoRA `Linear` in `model` to the fused forward; returns how many.

    The layer becomes a `FusedLoraLinear`, a subclass of peft's, so isinstance checks, saving,
    merging and adapter switching are unchanged; its forward falls back to peft's whenever it
    cannot fuse, or always with `enabled=False` (the benchmark's lever; calling this again on a
    fused model switches its layers).
    """
    n = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = FusedLoraLinear
        if isinstance(module, FusedLoraLinear):
            module.fuse = enabled
            n += 1
    return n
