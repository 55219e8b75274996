"""`dpo`: Direct Preference Optimization on preference pairs (and its IPO / hinge / robust variants).

The reference is the policy's starting point: for adapter methods the same model with the adapter
disabled (`ctx.reference`), so no second copy is held in memory; for `full` a frozen copy taken
before the first step (`common.frozen_reference`). OpenAI's `method: {type: dpo, dpo:
{hyperparameters: {beta}}}` maps onto this objective through `openai_method_to_config`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError
from tunery.objectives import OPENAI_METHOD_TYPES, register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import (
    collate_pairs,
    encode_pair_features,
    frozen_reference,
    pair_length,
    reference_row_logps,
    row_logps,
)
from tunery.objectives.losses import dpo_loss, preference_metrics


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (KL weight).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed rate of flipped labels (cDPO / robust DPO)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid = DPO; ipo = IPO (length-averaged); hinge = SLiC; robust = rDPO."
    )


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """`preference_metrics` and each side's implicit reward, as sums over pairs (the loop averages)."""
    return {
        **preference_metrics(chosen_rewards, rejected_rewards),
        "chosen_reward": float(chosen_rewards.sum()),
        "rejected_reward": float(rejected_rewards.sum()),
    }


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: DPOOptions = ctx.options
    n = batch["n_pairs"]
    policy, counts = row_logps(model, batch)
    ref = reference_row_logps(model, batch, ctx)
    losses, chosen_r, rejected_r = dpo_loss(
        policy[:n],
        policy[n:],
        ref[:n],
        ref[n:],
        beta=o.beta,
        label_smoothing=o.label_smoothing,
        loss_type=o.loss_type,
        chosen_lengths=counts[:n],
        rejected_lengths=counts[n:],
    )
    return StepOutput(losses.sum(), pair_metrics(chosen_r, rejected_r))


_OPENAI_HPARAMS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def openai_method_to_config(method: dict[str, Any]) -> dict[str, Any]:
    """Config keys for OpenAI's `method` object of a fine-tuning job request.

    `{"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}` becomes
    `{"objective": "dpo", "dpo": {"beta": 0.2}, "hyperparameters": {"n_epochs": 2}}`; "auto" values
    are left out so Tunery's own defaults apply. `reinforcement` maps onto `grpo` with custom Python
    reward callables refused (`allow_custom_rewards: false`): requests come from the network.
    """
    mtype = method.get("type", "supervised")
    if mtype not in OPENAI_METHOD_TYPES:
        raise ConfigError(
            f"Unsupported method type {mtype!r}; expected one of {', '.join(OPENAI_METHOD_TYPES)}.",
            param="method.type",
        )
    body = method.get(mtype) or {}
    hp = dict(body.get("hyperparameters") or {}) if isinstance(body, dict) else {}
    objective = OPENAI_METHOD_TYPES[mtype]
    out: dict[str, Any] = {"objective": objective}
    hyper = {k: hp.pop(k) for k in _OPENAI_HPARAMS if k in hp and hp[k] != "auto"}
    for k in _OPENAI_HPARAMS:
        hp.pop(k, None)
    if hyper:
        out["hyperparameters"] = hyper
    if objective == "dpo":
        beta = hp.pop("beta", "auto")
        if beta != "auto":
            out["dpo"] = {"beta": float(beta)}
    elif objective == "grpo":
        out["grpo"] = {"allow_custom_rewards": False}
    if hp:
        raise ConfigError(
            f"Unknown hyperparameter(s) for method {mtype!r}: {', '.join(sorted(hp))}.",
            param=f"method.{mtype}.hyperparameters",
        )
    return out


register(
    Objective(
        name="dpo",
        description="Direct Preference Optimization on chosen/rejected pairs (sigmoid, IPO, hinge, robust).",
        options=DPOOptions,
        data_kind="preference",
        encode=encode_pair_features,
        collate=collate_pairs,
        loss=loss,
        length=pair_length,
        setup=frozen_reference,
    )
)
