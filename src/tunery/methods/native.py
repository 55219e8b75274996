"""Save/load shared by the methods Tunery implements itself (freeze, adapter, unipelt, moe_lora).

Each such method saves only the tensors it trains, keyed by their parameter names in the applied
model, into `weights.safetensors`, plus its options in `method.json`. Loading rebuilds the structure
with the saved options (`apply`) and copies the tensors in, so the files stay small and need no
pickle. Switching between several saved adapters on one base is a tensor copy (`WeightSwitcher`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from tunery.errors import ModelError

WEIGHTS = "weights.safetensors"
OPTIONS = "method.json"


def save_named(model: torch.nn.Module, out: Path, names: list[str], options: BaseModel, method: str) -> None:
    """Write the named tensors (parameters or buffers) and the method's options."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {n: state[n].detach().cpu().contiguous().clone() for n in names}
    save_file(tensors, str(out / WEIGHTS), metadata={"tunery_method": method})
    (out / OPTIONS).write_text(json.dumps({"method": method, "options": options.model_dump(mode="json")}))


def read_options(path: Path, options_type: type[BaseModel]) -> BaseModel:
    file = Path(path) / OPTIONS
    if not file.exists():
        raise ModelError(f"{path} has no {OPTIONS}; it was not saved by this method.", param="adapter")
    saved = json.loads(file.read_text())["options"]
    # Only the fields these options have: the `moe` block is restored by its own layer (moe_base).
    return options_type.model_validate({k: v for k, v in saved.items() if k in options_type.model_fields})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    if not file.exists():
        raise ModelError(f"{path} has no {WEIGHTS}.", param="adapter")
    return load_file(str(file))


def copy_in(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path | str = "") -> None:
    """Copy saved tensors into the model; every saved name must exist with the same shape."""
    state = model.state_dict()
    bad = [n for n, t in weights.items() if n not in state or state[n].shape != t.shape]
    if bad:
        raise ModelError(
            f"Weights in {path} do not fit this base model (e.g. {bad[0]}).",
            hint="Load it onto the base model it was trained from.",
            param="adapter",
        )
    with torch.no_grad():
        for n, t in weights.items():
            state[n].copy_(t.to(state[n].dtype))


def load_native(
    base: torch.nn.Module,
    path: Path,
    options_type: type[BaseModel],
    apply: Callable[[torch.nn.Module, Any], torch.nn.Module],
    trainable: bool,
) -> torch.nn.Module:
    """Rebuild the method's structure on `base` from its saved options, then copy the weights in."""
    options = read_options(path, options_type)
    model = apply(base, options)  # apply marks the method's parameters trainable
    copy_in(model, read_weights(path), path)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


class WeightSwitcher:
    """Several saved adapters of one native method on one base, switched by name (tensor copies).

    The structure comes from the first adapter; the others must share its options (same shapes).
    `"base"` restores the tensors as they were before any adapter, when the method keeps an
    identity setting (freeze: the original layers; adapters: zero up-projections).
    """

    def __init__(self, model: torch.nn.Module, first: str, weights: dict[str, torch.Tensor]):
        self.model = model
        self.weights: dict[str, dict[str, torch.Tensor]] = {first: weights}
        self.active = first

    def add(self, name: str, path: Path) -> None:
        weights = read_weights(path)
        if set(weights) != set(self.weights[self.active]):
            raise ModelError(f"{path} does not have the same trained tensors as the loaded adapters.")
        self.weights[name] = weights

    def set(self, name: str) -> None:
        if name not in self.weights:
            raise ModelError(f"No adapter named {name!r}; loaded: {', '.join(self.weights)}.")
        copy_in(self.model, self.weights[name])
        self.active = name
