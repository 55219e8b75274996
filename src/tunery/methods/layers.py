"""Finding the parts of a decoder that the methods Tunery implements itself attach to (freeze,
adapter, unipelt, moe_lora): the layer stack, a layer's attention or MLP sublayer, the dtype new
parameters take, and a sublayer's hidden-state output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tunery.errors import ConfigError

ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, list) of the decoder's layer stack: the ModuleList as long as the depth."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and name.endswith("layers"):
            return name, module
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return name, module
    raise ConfigError("Could not find the decoder layers of this model.", param="method")


def sublayer(layer: torch.nn.Module, names: tuple[str, ...], what: str) -> torch.nn.Module:
    """The first child of `layer` named one of `names` (ATTENTION_NAMES, MLP_NAMES)."""
    for name in names:
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return getattr(layer, name)
    raise ConfigError(f"Decoder layers of this model have no {what} sublayer ({'/'.join(names)}).")


def float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype new parameters should use: the module's own float dtype (fp32 for 4-bit bases)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to a sublayer's hidden-state output, whether it is a tensor or a tuple."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)
