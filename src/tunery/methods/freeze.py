"""`freeze`: the base model trains only its last N decoder layers and/or named modules.

Cheap and robust: no new parameters, no change to the forward, so packing and merging are trivial.
Saved as a safetensors file of the trained tensors only (`weights.safetensors`), which loads back
onto the same base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError
from tunery.methods import native, register
from tunery.methods.base import Method, MoeBlock
from tunery.methods.layers import decoder_layers
from tunery.models.shape import ModelShape


class FreezeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: int = Field(2, ge=0, description="Train the last N decoder layers (0: none).")
    modules: list[str] = Field(
        default_factory=list,
        description="Also train modules with these names (e.g. lm_head, embed_tokens, norm).",
    )
    moe: MoeBlock


def trained_names(model: torch.nn.Module, options: FreezeOptions) -> list[str]:
    """Parameter names the options select, deduplicated for tied weights (named_parameters)."""
    stack, layers = decoder_layers(model)
    n = min(options.layers, len(layers))
    prefixes = [f"{stack}.{i}." for i in range(len(layers) - n, len(layers))]
    wanted = set(options.modules)
    found: set[str] = set()
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        hit = [m for m in wanted if m in parts[:-1]]
        found.update(hit)
        if hit or any(name.startswith(p) for p in prefixes):
            names.append(name)
    if wanted - found:
        tied = {"lm_head"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = wanted - found - tied
        if missing:
            raise ConfigError(
                f"freeze.modules: no module named {sorted(missing)[0]!r} in this model.",
                hint="Module names are path components, e.g. lm_head, embed_tokens, norm, mlp.",
                param="freeze.modules",
            )
        # A tied lm_head is the embedding matrix: train that one shared tensor.
        names.extend(n for n, _ in model.named_parameters() if n.endswith("embed_tokens.weight"))
    return sorted(set(names))


def apply(model: torch.nn.Module, options: FreezeOptions) -> torch.nn.Module:
    names = set(trained_names(model, options))
    if not names:
        raise ConfigError("freeze trains nothing: set freeze.layers > 0 or freeze.modules.", param="freeze")
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    model.tunery_freeze_options = options  # save() needs the selection again
    return model


def save(model: torch.nn.Module, out: Path) -> None:
    options = model.tunery_freeze_options
    native.save_named(model, out, trained_names(model, options), options, "freeze")


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    return native.load_native(base, path, FreezeOptions, apply, trainable)


def trainable_parameters(shape: ModelShape, options: FreezeOptions) -> tuple[int, str]:
    n = min(options.layers, shape.layers)
    # the head and the embedding are vocabulary-by-hidden matrices; other named modules (norms) are small
    extra = sum(shape.vocab * shape.hidden for m in options.modules if m in ("lm_head", "embed_tokens"))
    per_layer = shape.layer_parameters() + 2 * shape.hidden  # its linears and two norm weight vectors
    return n * per_layer + extra, f"the last {n} decoder layers train"


register(
    Method(
        name="freeze",
        description="Train only the last N layers and/or named modules (lm_head, embeddings); rest frozen.",
        options=FreezeOptions,
        apply=apply,
        save=save,
        load=load,
        base_learning_rate=5e-5,
        scale="~5-20% (last layers)",
        merge=lambda model: model,
        merge_note="the trained tensors are the model's own; nothing to fold",
        trainable_parameters=trainable_parameters,
    )
)
