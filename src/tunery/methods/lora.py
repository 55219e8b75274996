"""`lora`: low-rank adapters through peft, saved in PEFT's standard format (adapter_config.json).

Options cover rsLoRA, DoRA, LoRA+ (a larger learning rate for the B matrices) and PiSSA/OLoRA
initialisation. `qlora` reuses this module's functions on a 4-bit base.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock
from tunery.models.shape import ModelShape


class LoraFields(BaseModel):
    """The LoRA options `lora` and `qlora` share (qlora adds its own after them)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="Rank of the update.")
    alpha: float = Field(
        32, description="Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt; all-linear = every linear but the head."
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (magnitude + direction).")
    loraplus_lr_ratio: float | None = Field(
        None, description="LoRA+: B matrices learn this many times faster."
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Initialisation of A and B."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved (e.g. lm_head)."
    )


class LoraOptions(LoraFields):
    moe: MoeBlock


def peft_config(options: LoraFields, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    init: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[options.init]
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_rslora=options.rslora,
        use_dora=options.dora,
        init_lora_weights=init,
        modules_to_save=options.modules_to_save,
        task_type=task_type,
    )


def apply(model: torch.nn.Module, options: LoraFields) -> torch.nn.Module:
    return peft_common.apply_config(model, peft_config(options))


def param_groups(model: torch.nn.Module, options: LoraFields, lr: float) -> list[dict[str, Any]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not options.loraplus_lr_ratio:
        return [{"params": [p for _, p in params], "lr": lr}]
    b = [p for n, p in params if "lora_B" in n]
    rest = [p for n, p in params if "lora_B" not in n]
    return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * options.loraplus_lr_ratio}]


def trainable_parameters(shape: ModelShape, options: LoraFields) -> tuple[int, str]:
    return shape.low_rank_parameters(options.r), f"rank-{options.r} adapters on every linear layer"


register(
    Method(
        name="lora",
        description="Low-rank adapters on the linear layers (rsLoRA, DoRA, LoRA+, PiSSA/OLoRA init).",
        options=LoraOptions,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge=peft_common.merge,
        param_groups=param_groups,
        trainable_parameters=trainable_parameters,
        base_learning_rate=2e-4,
        scale="~0.5-2%",
    )
)
