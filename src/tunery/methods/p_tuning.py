"""`p_tuning`: P-tuning through peft: virtual-token embeddings produced by a small prompt encoder
(an MLP or an LSTM) and prepended to the input. After training only the produced prompt matters."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock


class PTuningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder type.")
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of the prompt encoder.")
    encoder_num_layers: int = Field(2, ge=1, description="Layers of the prompt encoder.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prompt encoder.")
    moe: MoeBlock


def apply(model: torch.nn.Module, options: PTuningOptions) -> torch.nn.Module:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=options.num_virtual_tokens,
        encoder_reparameterization_type=options.encoder.upper(),
        encoder_hidden_size=options.encoder_hidden_size,
        encoder_num_layers=options.encoder_num_layers,
        encoder_dropout=options.encoder_dropout,
    )
    return peft_common.apply_config(model, config)


register(
    Method(
        name="p_tuning",
        description="P-tuning: virtual tokens from an MLP or LSTM prompt encoder, prepended to the input.",
        options=PTuningOptions,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge_note="the prompt is extra input, not a weight change",
        base_learning_rate=1e-2,
        scale="~0.1-1% (encoder)",
        supports_packing=False,
    )
)
