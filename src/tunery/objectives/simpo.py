"""`simpo`: SimPO, reference-free preference optimization with length-normalised log-likelihoods
and a target reward margin (Meng et al. 2024). No reference model: half the forward passes of DPO."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import collate_pairs, encode_pair_features, pair_length, row_logps
from tunery.objectives.dpo import pair_metrics
from tunery.objectives.losses import simpo_loss


class SimPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward.")
    gamma_beta_ratio: float = Field(0.5, ge=0, description="Target margin gamma, as a fraction of beta.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed rate of flipped labels.")


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: SimPOOptions = ctx.options
    n = batch["n_pairs"]
    total, counts = row_logps(model, batch)
    avg = total / counts.clamp(min=1)
    losses, chosen_r, rejected_r = simpo_loss(avg[:n], avg[n:], o.beta, o.gamma_beta_ratio, o.label_smoothing)
    return StepOutput(losses.sum(), pair_metrics(chosen_r, rejected_r))


register(
    Objective(
        name="simpo",
        description="SimPO: reference-free, length-normalised preference optimization with a margin.",
        options=SimPOOptions,
        data_kind="preference",
        encode=encode_pair_features,
        collate=collate_pairs,
        loss=loss,
        length=pair_length,
    )
)
