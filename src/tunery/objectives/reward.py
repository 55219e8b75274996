"""`reward`: a reward model. A scalar head on the base model, read at each sequence's last token and
trained with the Bradley-Terry pairwise loss on preference pairs. Logs accuracy (chosen scored above
rejected) and the mean margin.

Its `head` hook turns the loaded causal LM into `AutoModelForSequenceClassification` with one
label by moving its decoder into the classification class (no second load) and adding a fresh
`score` head; the head trains in full under any method (`score` goes to LoRA's `modules_to_save`,
`freeze.modules`). The saved model loads back with `load_reward_model`, which `tunery score` and
GRPO's `reward_model` use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.data import encode_completion, encode_pair
from tunery.errors import ConfigError, DataError, ModelError
from tunery.methods import read_info
from tunery.methods.loading import load_saved_method, saved_tokenizer
from tunery.models import load_model
from tunery.models.load_lock import LOAD_LOCK
from tunery.models.placement import model_device, to_device
from tunery.models.unwrap import unwrap
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import collate_rows, last_token_hidden
from tunery.objectives.losses import bradley_terry_loss, preference_metrics

HEAD = "score"  # transformers' name for the head of decoder-only sequence classifiers


class RewardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    center_coefficient: float | None = Field(
        None, ge=0, description="Weight of a (r_chosen + r_rejected)^2 term that keeps rewards centred."
    )


def head(config: Any, load: Callable[..., torch.nn.Module]) -> tuple[torch.nn.Module, list[str]]:
    """The `head` hook: the base causal LM, loaded as the recipe would, under a fresh `score` head."""
    return add_score_head(load()), [HEAD]


def add_score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM's decoder under a one-output `score` head (sequence classification)."""
    from transformers import AutoModelForSequenceClassification

    body_name = model.base_model_prefix
    body = getattr(model, body_name, None)
    cfg = model.config
    cfg.num_labels = 1
    try:
        with LOAD_LOCK, torch.device("meta"):  # the shell only: its body is replaced by the decoder
            shell = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as exc:
        raise ConfigError(
            f"The reward objective needs a sequence-classification head, which {cfg.model_type!r} "
            f"models do not have in transformers: {exc}",
            param="objective",
        ) from None
    old_head = getattr(shell, HEAD, None)
    if body is None or not isinstance(old_head, torch.nn.Linear):
        raise ConfigError(
            f"The reward objective does not support {cfg.model_type!r} models (no `{HEAD}` head).",
            param="objective",
        )
    setattr(shell, body_name, body)
    weight = next(body.parameters())
    score = torch.nn.Linear(old_head.in_features, 1, bias=False, device=weight.device, dtype=torch.float32)
    torch.nn.init.normal_(score.weight, std=getattr(cfg, "initializer_range", 0.02))
    setattr(shell, HEAD, score)
    shell.config = cfg  # one config object: attention settings made on the wrapper reach the body
    return _scoring_only(shell)


def _scoring_only(model: torch.nn.Module) -> torch.nn.Module:
    """Adapter methods wrap models as causal LMs (peft's CAUSAL_LM task), which looks up the
    generation hook at wrap time; a reward model has none, so it gets one that explains why."""

    def no_generation(*args: Any, **kwargs: Any) -> Any:
        raise ModelError("A reward model scores text; it cannot generate.", param="model")

    model.prepare_inputs_for_generation = no_generation
    return model


def encode(example: Any, tokenizer: Any, config: Any) -> dict[str, Any]:
    f = encode_pair(example, tokenizer, config.hyperparameters.max_length)
    return {
        "chosen": f["prompt_ids"] + f["chosen_ids"],
        "rejected": f["prompt_ids"] + f["rejected_ids"],
        "truncated": f["truncated"],
    }


def length(f: dict[str, Any]) -> int:
    return len(f["chosen"]) + len(f["rejected"])


def collate(features: list[dict[str, Any]], pad_id: int, packed: bool) -> dict[str, Any]:
    rows = [f["chosen"] for f in features] + [f["rejected"] for f in features]
    batch = collate_rows(rows, None, pad_id, packed)
    batch["n_pairs"] = batch["n_units"] = len(features)
    return batch


def scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The reward of every row (`[n_rows]`, float32): the head at the row's last token."""
    base = unwrap(model)
    last = last_token_hidden(base, batch)
    score = getattr(base, HEAD)
    return score(last.to(next(score.parameters()).dtype)).squeeze(-1).float()


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: RewardOptions = ctx.options
    n = batch["n_pairs"]
    r = scores(model, batch)
    losses, _, _ = bradley_terry_loss(r[:n], r[n:], center_coefficient=o.center_coefficient)
    return StepOutput(losses.sum(), preference_metrics(r[:n], r[n:]))


def load_reward_model(adapter: str | Path, model: str | None = None, dtype: Any = None):
    """(reward model, tokenizer) from a saved model dir of a `reward` run (`model/`, a checkpoint)."""
    info = read_info(adapter)
    if info.get("objective") != "reward":
        raise ModelError(
            f"{adapter} was trained with objective {info.get('objective')!r}, not 'reward'.",
            hint="Train a reward model with `objective: reward` on preference pairs.",
            param="reward_model",
        )
    spec = model or info.get("base_model")
    tokenizer = saved_tokenizer(info, spec)

    def build_base(**kwargs: Any) -> torch.nn.Module:
        # The base model with a fresh head; the trained head comes from the adapter (`method.load`).
        base = load_model(
            spec, dtype=dtype, task="sequence-classification", num_labels=1, new_head=True, **kwargs
        )
        return _scoring_only(base)

    return load_saved_method(info, build_base).eval(), tokenizer


@torch.no_grad()
def score_conversations(
    model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict[str, Any]]], batch_size: int = 16
) -> list[float]:
    """The reward of each conversation (its last assistant reply in context), as trained: the chat
    template's rendering up to the reply's end-of-turn token."""
    out: list[float] = []
    for start in range(0, len(conversations), batch_size):
        rows = []
        for k, messages in enumerate(conversations[start : start + batch_size], start):
            replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not replies:
                raise DataError("Nothing to score: the conversation has no assistant reply.", line=k + 1)
            f = encode_completion(messages[: replies[-1]], messages[replies[-1] :], tokenizer, None)
            rows.append(f["prompt_ids"] + f["completion_ids"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = to_device(collate_rows(rows, None, pad, packed=False), model_device(model))
        values = scores(model, batch)
        out.extend(float(v) if math.isfinite(float(v)) else 0.0 for v in values)
    return out


register(
    Objective(
        name="reward",
        description="Reward model: a scalar head trained with the Bradley-Terry loss on preference pairs.",
        options=RewardOptions,
        data_kind="preference",
        encode=encode,
        collate=collate,
        loss=loss,
        length=length,
        head=head,
    )
)
