"""`prefix_tuning`: learned key/value prefixes in every attention layer, through peft.

The prefixes enter as past key/values, so the model's own forward runs (padded rows, no packing).
`projection` reparameterises the prefix through an MLP during training, which stabilises it.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock


class PrefixTuningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length per layer.")
    projection: bool = Field(False, description="Reparameterise the prefix through a 2-layer MLP.")
    encoder_hidden_size: int | None = Field(None, description="Hidden size of that MLP (default: model's).")
    moe: MoeBlock


def apply(model: torch.nn.Module, options: PrefixTuningOptions) -> torch.nn.Module:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=options.num_virtual_tokens,
        prefix_projection=options.projection,
        encoder_hidden_size=options.encoder_hidden_size or model.config.hidden_size,
    )
    return peft_common.apply_config(model, config)


register(
    Method(
        name="prefix_tuning",
        description="Learned key/value prefixes in every attention layer (optional MLP reparameterisation).",
        options=PrefixTuningOptions,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge_note="prefixes are extra attention keys/values, not a weight change",
        base_learning_rate=1e-2,
        scale="~0.1%",
        supports_packing=False,
    )
)
