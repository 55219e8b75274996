"""`adalora`: AdaLoRA through peft: LoRA in SVD form whose rank budget shrinks from `init_r` to
`target_r` per matrix during training, keeping the singular directions that matter most.

The budget follows peft's cubic schedule: `tinit` warm-up steps at full rank, a shrinking phase,
then `tfinal` steps at the final allocation. The loop calls `after_step` after every optimizer
step (before the gradients are cleared, which score importance) and adds the orthogonality
regulariser through `aux_loss`, because peft only adds it when labels go through the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.methods import peft_common, register
from tunery.methods.base import Method, MoeBlock
from tunery.models.shape import ModelShape

PLACEHOLDER_STEPS = 1_000_000  # peft needs a total at creation; the real one is set on the first step


class AdaLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_r: int = Field(12, ge=1, description="Initial rank of every adapted matrix.")
    target_r: int = Field(8, ge=1, description="Average rank kept at the end.")
    alpha: float = Field(32, description="Scale numerator of the update.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt.")
    tinit: float = Field(0.1, ge=0, lt=1, description="Fraction of the total steps before pruning starts.")
    tfinal: float = Field(0.2, ge=0, lt=1, description="Fraction of the total steps at the final budget.")
    delta_t: int = Field(1, ge=1, description="Reallocate the budget every this many steps.")
    beta1: float = Field(0.85, description="EMA coefficient of the importance (sensitivity).")
    beta2: float = Field(0.85, description="EMA coefficient of the importance's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser.")
    moe: MoeBlock


def peft_config(options: AdaLoraOptions):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=options.init_r,
        target_r=options.target_r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        tinit=0,
        tfinal=0,
        deltaT=options.delta_t,
        beta1=options.beta1,
        beta2=options.beta2,
        orth_reg_weight=options.orth_reg_weight,
        total_step=PLACEHOLDER_STEPS,
    )


def apply(model: torch.nn.Module, options: AdaLoraOptions) -> torch.nn.Module:
    model = peft_common.apply_config(model, peft_config(options))
    model.tunery_adalora_options = options
    return model


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    model = peft_common.load(base, path, trainable)
    if trainable:  # continued training restarts the schedule over the new run's steps
        cfg = model.peft_config[model.active_adapter]
        model.tunery_adalora_options = AdaLoraOptions(
            init_r=cfg.init_r, target_r=cfg.target_r, orth_reg_weight=cfg.orth_reg_weight
        )
    return model


def _peft(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # unwrap DDP if accelerate wrapped it


def after_step(model: torch.nn.Module, step: int, total_steps: int) -> None:
    model = _peft(model)
    cfg = model.peft_config[model.base_model.trainable_adapter_name]
    if cfg.total_step == PLACEHOLDER_STEPS or cfg.total_step != total_steps:
        opts = getattr(model, "tunery_adalora_options", None) or AdaLoraOptions()
        cfg.total_step = total_steps
        cfg.tinit = int(opts.tinit * total_steps)
        # keep at least one step of budgeting between warm-up and the final phase
        cfg.tfinal = max(0, min(int(opts.tfinal * total_steps), total_steps - cfg.tinit - 1))
    model.base_model.update_and_allocate(step)


def aux_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """peft's orthogonal regulariser: mean ||P P^T - I||_F over the A and B matrices, weighted."""
    model = _peft(model)
    name = model.base_model.trainable_adapter_name
    weight = model.peft_config[name].orth_reg_weight
    if not weight:
        return None
    total, count = None, 0
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n and p.requires_grad:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
            term = torch.linalg.matrix_norm(cov - eye)
            total = term if total is None else total + term
            count += 1
    return None if total is None else weight * total / count


def trainable_parameters(shape: ModelShape, options: AdaLoraOptions) -> tuple[int, str]:
    # A, B and the singular values E of each adapted matrix, at the initial rank (pruning masks,
    # it does not free)
    r = options.init_r
    singular = shape.layers * len(shape.linears()) * r
    return shape.low_rank_parameters(r) + singular, f"rank-{r} SVD adapters on every linear layer"


register(
    Method(
        name="adalora",
        description="AdaLoRA: SVD-form LoRA that reallocates an adaptive rank budget during training.",
        options=AdaLoraOptions,
        apply=apply,
        save=peft_common.save,
        load=load,
        merge=peft_common.merge,
        after_step=after_step,
        trainable_parameters=trainable_parameters,
        aux_loss=aux_loss,
        base_learning_rate=5e-4,
        scale="~0.5-2%",
    )
)
