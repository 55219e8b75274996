"""`orpo`: ORPO, SFT on the chosen reply plus an odds-ratio penalty on the rejected one, in one
stage and without a reference model (Hong et al. 2024).

Per pair: `-avg log p(chosen) + lambda * -log s(log odds(chosen) - log odds(rejected))`. The NLL is
the chosen reply's per-token mean, so every pair weighs the same (TRL averages the NLL over all
chosen tokens of the batch instead; the odds-ratio term is identical).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import collate_pairs, encode_pair_features, pair_length, row_logps
from tunery.objectives.losses import orpo_loss


class ORPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Weight lambda of the odds-ratio term against the SFT loss.")


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: ORPOOptions = ctx.options
    n = batch["n_pairs"]
    total, counts = row_logps(model, batch)
    avg = total / counts.clamp(min=1)
    odds_term, log_odds = orpo_loss(avg[:n], avg[n:], o.beta)
    nll = -avg[:n]
    metrics = {
        "nll": float(nll.detach().sum()),
        "log_odds_ratio": float(log_odds.sum()),
        "accuracy": float((log_odds > 0).float().sum()),
        # the margin ORPO moves: length-normalised log p(chosen) - log p(rejected)
        "margin": float((avg[:n] - avg[n:]).detach().sum()),
    }
    return StepOutput((nll + odds_term).sum(), metrics)


register(
    Objective(
        name="orpo",
        description="ORPO: SFT on chosen replies plus an odds-ratio penalty on rejected ones, no reference.",
        options=ORPOOptions,
        data_kind="preference",
        encode=encode_pair_features,
        collate=collate_pairs,
        loss=loss,
        length=pair_length,
    )
)
