"""`pretrain`: continued pretraining on plain text, every token trained.

Each document becomes one or more examples of at most `max_length` tokens (a long document is split
into consecutive chunks, nothing is dropped). The loop packs a micro-batch's examples into one row
with attention isolated per example, so documents are packed to `max_length` segments without ever
attending across a document boundary (and without padding). Chat data is read as ChatML text.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tunery.data import encode_text
from tunery.data.types import Text
from tunery.objectives import register
from tunery.objectives.base import Objective
from tunery.objectives.sft import collate, loss


class PretrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def encode(example: Text, tokenizer: Any, config: Any) -> list[dict[str, Any]] | None:
    ids = encode_text(example.text, tokenizer)
    size = config.hyperparameters.max_length
    # A chunk of one token has no next token to predict: nothing to learn from it.
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    feats = [{"input_ids": c, "labels": list(c)} for c in chunks if len(c) > 1]
    return feats or None


register(
    Objective(
        name="pretrain",
        description="Continued pretraining on plain text, documents split to max_length and packed.",
        options=PretrainOptions,
        data_kind="text",
        encode=encode,
        collate=collate,
        token_level=True,
        loss=loss,
    )
)
