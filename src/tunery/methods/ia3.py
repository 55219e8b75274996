"""`ia3`: (IA)^3 through peft: learned vectors rescale keys, values and the feed-forward activations.

The smallest update of the weight-based methods (one vector per adapted module) and it merges
exactly: each vector folds into its linear layer.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock
from tunery.models.shape import ModelShape


class IA3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | None = Field(
        None, description="Modules to rescale; default: peft's choice for the architecture (k, v, down)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which targets are feed-forward (scaled at their input, not output)."
    )
    moe: MoeBlock


def peft_config(options: IA3Options, model: torch.nn.Module | None = None):
    from peft import IA3Config

    targets, ff = options.target_modules, options.feedforward_modules
    if targets is None and model is not None:
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as F
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as T

        # peft's table per architecture, keeping only names this model has as linear layers:
        # fused MoE experts (transformers 5 Mixtral/OLMoE) have no `w2`/`down_proj` Linear.
        kind = getattr(model.config, "model_type", "")
        linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = [t for t in T.get(kind, ["k_proj", "v_proj", "down_proj"]) if t in linears]
        targets = targets or [t for t in ("k_proj", "v_proj", "down_proj") if t in linears]
        ff = [f for f in (ff or F.get(kind, ["down_proj"])) if f in targets]
    return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")


def apply(model: torch.nn.Module, options: IA3Options) -> torch.nn.Module:
    return peft_common.apply_config(model, peft_config(options, model))


def trainable_parameters(shape: ModelShape, options: IA3Options) -> tuple[int, str]:
    # one scale per key and value output, and per input feature of the MLP's down projection
    return shape.layers * (2 * shape.kv + shape.inter * shape.experts), "scaling vectors on k, v and the FFN"


register(
    Method(
        name="ia3",
        description="(IA)^3: learned scaling vectors on keys, values and FFN activations; tiny, merges.",
        options=IA3Options,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge=peft_common.merge,
        trainable_parameters=trainable_parameters,
        base_learning_rate=3e-3,
        scale="~0.01%",
    )
)
