"""`kto`: Kahneman-Tversky Optimization on unpaired judged completions (desirable or not).

The reference point z0 is KTO's KL estimate on mismatched pairs: prompt i with completion i-1 of the
same micro-batch (`losses.kto_mismatched_order`), computed in the same forward pass as the matched
rows and detached. The reference model is handled as for DPO (adapter disabled, or a frozen copy
for `full`). Preference pairs are accepted too: the loader unpairs them (chosen desirable).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.data import encode_completion
from tunery.data.types import Unpaired
from tunery.errors import DataError
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import (
    collate_rows,
    completion_row,
    frozen_reference,
    reference_row_logps,
    row_logps,
)
from tunery.objectives.losses import kto_kl_estimate, kto_loss, kto_mismatched_order


class KTOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable examples.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="Loss weight of undesirable ones (raise it when they are rarer)."
    )


def encode(example: Unpaired, tokenizer: Any, config: Any) -> dict[str, Any]:
    try:
        feats = encode_completion(
            example.prompt, example.completion, tokenizer, config.hyperparameters.max_length
        )
    except DataError as err:
        raise DataError(err.message, err.hint, line=example.line or None, code=err.code) from None
    feats["desirable"] = bool(example.desirable)
    return feats


def length(f: dict[str, Any]) -> int:
    return 2 * (len(f["prompt_ids"]) + len(f["completion_ids"]))


def collate(features: list[dict[str, Any]], pad_id: int, packed: bool) -> dict[str, Any]:
    """Matched rows 0..n-1, then the mismatched rows n..2n-1 for the KL estimate; units = examples."""
    n = len(features)
    order = kto_mismatched_order(n)
    pairs = [(f["prompt_ids"], f["completion_ids"]) for f in features]
    pairs += [(features[i]["prompt_ids"], features[order[i]]["completion_ids"]) for i in range(n)]
    rows, labels = zip(*(completion_row(p, c) for p, c in pairs), strict=True)
    batch = collate_rows(rows, labels, pad_id, packed)
    batch["desirable"] = torch.tensor([f["desirable"] for f in features])
    batch["n_examples"] = n
    batch["n_units"] = n
    batch["n_tokens"] = sum(len(p) + len(c) for p, c in pairs[:n])
    return batch


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: KTOOptions = ctx.options
    n = batch["n_examples"]
    policy, _ = row_logps(model, batch)
    ref = reference_row_logps(model, batch, ctx)
    z0 = kto_kl_estimate(policy[n:].detach(), ref[n:])
    desirable = batch["desirable"]
    losses, rewards = kto_loss(
        policy[:n], ref[:n], desirable, z0, o.beta, o.desirable_weight, o.undesirable_weight
    )
    sign = desirable.float() * 2 - 1
    metrics = {
        # mean of +reward for desirable and -reward for undesirable examples: rises as the policy
        # moves towards the desirable completions and away from the others
        "margin": float((sign * rewards).sum()),
        "kl": float(z0) * n,
    }
    return StepOutput(losses.sum(), metrics)


register(
    Objective(
        name="kto",
        description="KTO: unpaired desirable/undesirable completions against a reference point.",
        options=KTOOptions,
        data_kind="unpaired",
        encode=encode,
        collate=collate,
        loss=loss,
        length=length,
        setup=frozen_reference,
    )
)
