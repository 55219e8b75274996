"""`adapter`: bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020), implemented here.

Each adapter is down-projection -> nonlinearity -> up-projection with a residual around it, applied
to a sublayer's output: Houlsby places one after attention and one after the MLP, Pfeiffer only
after the MLP. The up-projection starts at zero, so training starts from the base model exactly.

Options sit under `adapter:` beside `method: adapter`; continuing training from a saved model uses
the separate `init_from:` key.

The adapter is attached as a child module of the sublayer (`<layer>.mlp.tunery_adapter`) and runs
from a forward hook on that sublayer. The model's own structure and forward stay unchanged, so
packed attention, checkpoints and other hooks keep working. It cannot merge: the nonlinearity sits
between the two projections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import native, register
from tunery.methods.base import Method, MoeBlock
from tunery.methods.layers import (
    ATTENTION_NAMES,
    MLP_NAMES,
    decoder_layers,
    float_dtype,
    map_output,
    sublayer,
)
from tunery.models.shape import ModelShape

MARK = "tunery_adapter"
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    style: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after attention and after the MLP; pfeiffer: after the MLP only."
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck size = hidden size / this.")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Between projections.")
    moe: MoeBlock


class Bottleneck(torch.nn.Module):
    """h -> up(act(down(h))); zero up-projection so the adapter starts as the identity residual."""

    def __init__(self, hidden: int, size: int, nonlinearity: str, dtype: torch.dtype):
        super().__init__()
        self.down = torch.nn.Linear(hidden, size, dtype=dtype)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = torch.nn.Linear(size, hidden, dtype=dtype)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


def _adapter_hook(module: torch.nn.Module, args, output):
    adapter = getattr(module, MARK)
    return map_output(output, lambda h: h + adapter(h).to(h.dtype))


def apply(model: torch.nn.Module, options: AdapterOptions) -> torch.nn.Module:
    hidden = model.config.hidden_size
    size = max(1, hidden // options.reduction_factor)
    _, layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    places = (ATTENTION_NAMES, MLP_NAMES) if options.style == "houlsby" else (MLP_NAMES,)
    for layer in layers:
        for names in places:
            sub = sublayer(layer, names, "attention" if names is ATTENTION_NAMES else "MLP")
            sub.add_module(MARK, Bottleneck(hidden, size, options.nonlinearity, float_dtype(sub)))
            sub.register_forward_hook(_adapter_hook)
    model.tunery_adapter_options = options
    return model


def adapter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if MARK in n.split(".")]


def save(model: torch.nn.Module, out: Path) -> None:
    native.save_named(model, out, adapter_names(model), model.tunery_adapter_options, "adapter")


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    return native.load_native(base, path, AdapterOptions, apply, trainable)


def trainable_parameters(shape: ModelShape, options: AdapterOptions) -> tuple[int, str]:
    size = max(1, shape.hidden // options.reduction_factor)
    per_adapter = 2 * shape.hidden * size + size + shape.hidden  # down and up projections with biases
    places = 2 if options.style == "houlsby" else 1
    return shape.layers * places * per_adapter, f"size-{size} bottleneck adapters ({options.style})"


register(
    Method(
        name="adapter",
        description="Bottleneck adapters after attention+MLP (Houlsby) or after the MLP (Pfeiffer).",
        options=AdapterOptions,
        apply=apply,
        save=save,
        load=load,
        merge_note="the nonlinearity between the projections cannot fold into the base weights",
        trainable_parameters=trainable_parameters,
        base_learning_rate=1e-3,
        scale="~0.5-3%",
    )
)
