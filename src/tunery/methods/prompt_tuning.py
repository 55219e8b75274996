"""`prompt_tuning`: learned soft-prompt embeddings prepended to every input, through peft.

The base is untouched; only `num_virtual_tokens` embedding vectors train. The prompt starts from
random vectors or from the embeddings of an initial text (often better, e.g. a task description).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError
from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock
from tunery.models.shape import ModelShape


class PromptTuningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, ge=1, description="Length of the learned soft prompt.")
    init: Literal["random", "text"] = Field("random", description="Start from random vectors or from text.")
    init_text: str | None = Field(None, description="With init=text: the text whose embeddings start it.")
    moe: MoeBlock


def apply(model: torch.nn.Module, options: PromptTuningOptions) -> torch.nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit

    kwargs = {}
    if options.init == "text":
        if not options.init_text:
            raise ConfigError("prompt_tuning.init=text needs prompt_tuning.init_text.", param="prompt_tuning")
        kwargs = {
            "prompt_tuning_init": PromptTuningInit.TEXT,
            "prompt_tuning_init_text": options.init_text,
            "tokenizer_name_or_path": peft_common.base_dir(model),
        }
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens, **kwargs
    )
    return peft_common.apply_config(model, config)


def trainable_parameters(shape: ModelShape, options: PromptTuningOptions) -> tuple[int, str]:
    return options.num_virtual_tokens * shape.hidden, f"{options.num_virtual_tokens} virtual-token embeddings"


register(
    Method(
        name="prompt_tuning",
        description="Soft prompt: learned virtual-token embeddings before the input (text or random init).",
        options=PromptTuningOptions,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge_note="a soft prompt is extra input, not a weight change; serve it with the adapter",
        base_learning_rate=3e-2,
        scale="~0.001-0.01%",
        supports_packing=False,  # the virtual tokens change the forward: rows are padded
        trainable_parameters=trainable_parameters,
    )
)
