"""`full`: every parameter trains. Saved as a plain transformers model (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunery.methods import register
from tunery.methods.base import Method, NoOptions


def apply(model: torch.nn.Module, options: NoOptions) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: torch.nn.Module, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    # A full fine-tune *is* a model directory: load its weights into the base's architecture.
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"weights in {path} do not fit the base model: {unexpected[:3]}")
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    for p in base.parameters():
        p.requires_grad_(trainable)
    return base


register(
    Method(
        name="full",
        description="All parameters train. Best quality per example, most memory, risk of forgetting.",
        options=NoOptions,
        apply=apply,
        save=save,
        load=load,
        base_learning_rate=2e-5,
        scale="100%",
        merge=lambda model: model,
        merge_note="already a plain model",
    )
)
