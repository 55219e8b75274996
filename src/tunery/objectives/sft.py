"""`sft`: supervised fine-tuning. Cross-entropy on the trained tokens (assistant replies by default),
averaged per supervised token over the whole optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from tunery.data import encode_chat
from tunery.modeling.forward import IGNORE, packed_inputs, padded_inputs, supervised_loss
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput


class SFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def encode(example: Any, tokenizer: Any, config: Any) -> dict[str, Any] | None:
    feats = encode_chat(
        example,
        tokenizer,
        config.hyperparameters.max_length,
        train_on_prompt=config.data.train_on_prompt,
        system_prompt=config.data.system_prompt,
    )
    if not any(t != IGNORE for t in feats["labels"][1:]):
        return None  # nothing to learn from (e.g. every assistant message has weight 0)
    return feats


def collate(
    features: list[dict[str, Any]], pad_id: int, packed: bool, share_prefix: bool = False
) -> dict[str, Any]:
    rows = [f["input_ids"] for f in features]
    labels = [f["labels"] for f in features]
    batch = packed_inputs(rows, labels, share_prefix) if packed else padded_inputs(rows, pad_id, labels)
    batch["n_units"] = int((batch["labels"] != IGNORE).sum())
    batch["n_tokens"] = sum(len(r) for r in rows)
    return batch


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    total, correct, _ = supervised_loss(model, batch)
    return StepOutput(total, {"mean_token_accuracy": float(correct)})


register(
    Objective(
        name="sft",
        description="Supervised fine-tuning on the assistant replies (or the whole text).",
        options=SFTOptions,
        data_kind="chat",
        encode=encode,
        collate=collate,
        token_level=True,
        shares_prefix=True,
        loss=loss,
    )
)
