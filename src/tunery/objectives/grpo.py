"""`grpo`: online RL with Group Relative Policy Optimization (Shao et al. 2024).

Per prompt the policy samples G completions (`generation.generate.generate_batch`, the one generation
path), a reward model from `reward` and/or reward functions score them (`rewards.py`), and each
completion's advantage is its reward normalised within its group. The loss is the clipped surrogate
with a k3 KL penalty to the reference (the base with the adapter disabled, or a frozen copy for
`full`), as in `losses.grpo_loss`. Logged: mean reward (and per reward function), KL, completion length.

Units: the loop calls `rollout` on every micro-batch of a step before summing `n_units`, because
the units exist only after sampling: completions (`loss_type: grpo`), completion tokens (`dapo`,
one mean over the whole step) or micro-batches (`bnpo`). One policy update per rollout, so the
"old" policy of the ratio is the current one, detached (ratio 1, gradient of the surrogate intact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.data import encode_prompt
from tunery.data.types import Conversation
from tunery.errors import ConfigError
from tunery.generation.generate import generate_batch
from tunery.generation.sequence import GenerationParams
from tunery.modeling.forward import IGNORE
from tunery.models.placement import model_device, place, to_device
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import (
    collate_rows,
    completion_row,
    frozen_reference,
    label_logps,
    reference_label_logps,
    unpack_rows,
)
from tunery.objectives.judge import judge_scorer
from tunery.objectives.losses import group_advantages, grpo_loss
from tunery.objectives.reward import load_reward_model, score_conversations
from tunery.objectives.rewards import RewardSpec, bind

# A scorer rates a batch of completions: (texts, examples) -> one reward each.
Scorer = tuple[str, float, Callable[[list[str], list[dict[str, Any]]], list[float]]]


class GRPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the reference (0: none).")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the probability ratio.")
    epsilon_high: float | None = Field(None, description="Upper clip (DAPO's clip-higher); default epsilon.")
    loss_type: Literal["grpo", "dapo", "bnpo"] = Field(
        "grpo", description="Mean per completion (grpo), per token of the step (dapo) or per micro-batch."
    )
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std.")
    reward_functions: list[RewardSpec] = Field(
        default_factory=list, description="Reward functions: [{name: contains, word: blue}, ...]."
    )
    reward_model: str | None = Field(
        None,
        description="A saved `reward` run's model dir scoring completions (on a server: an ft: model).",
        json_schema_extra={"names": "adapter"},  # checked by the server's resolver (serve/resolver.py)
    )
    allow_custom_rewards: bool = Field(
        True, description="Accept module:function reward callables (the server turns this off)."
    )


def encode(example: Conversation, tokenizer: Any, config: Any) -> dict[str, Any]:
    ids = encode_prompt(example.messages, tokenizer, example.tools)
    limit = max(1, config.hyperparameters.max_length - 1)
    truncated = len(ids) > limit
    if truncated:  # keep the end: the generation header and the latest turn matter most
        ids = ids[-limit:]
    info = {**example.extra, "messages": example.messages}
    return {"input_ids": ids, "example": info, "truncated": truncated}


def collate(features: list[dict[str, Any]], pad_id: int, packed: bool) -> dict[str, Any]:
    """Prompts only; `rollout` turns them into completion rows and sets the units."""
    return {
        "prompts": [f["input_ids"] for f in features],
        "examples": [f["example"] for f in features],
        "pad_id": pad_id,
        "packed": packed,
        "n_units": len(features),
    }


# --------------------------------------------------------------------------- rewards


def scorers(options: Any) -> list[Scorer]:
    """Everything that rewards a completion, loaded and checked before training starts."""
    out: list[Scorer] = []
    for name, weight, fn in bind(options.reward_functions, options.allow_custom_rewards):
        out.append(
            (
                name,
                weight,
                lambda texts, examples, fn=fn: [fn(t, e) for t, e in zip(texts, examples, strict=True)],
            )
        )
    if options.reward_model:
        out.append(("reward_model", 1.0, _reward_model_scorer(options.reward_model)))
    judge = getattr(options, "judge", None)
    if judge is not None:
        out.append(("judge", judge.weight, judge_scorer(judge)))
    if not out:
        raise ConfigError(
            "GRPO needs something to reward completions with.",
            hint="Set grpo.reward_functions (e.g. [{name: contains, word: blue}]) or grpo.reward_model.",
            param="reward_functions",
        )
    return out


def _reward_model_scorer(path: str) -> Callable[[list[str], list[dict[str, Any]]], list[float]]:
    model, tokenizer = load_reward_model(path, dtype=torch.float32)
    model = place(model)

    def score(texts: list[str], examples: list[dict[str, Any]]) -> list[float]:
        convs = [
            e["messages"] + [{"role": "assistant", "content": t}]
            for t, e in zip(texts, examples, strict=True)
        ]
        return score_conversations(model, tokenizer, convs)

    return score


def setup(model: torch.nn.Module, config: Any, tokenizer: Any) -> dict[str, Any]:
    options = config.objective_options
    extra: dict[str, Any] = {"scorers": scorers(options)}
    if options.beta:
        extra.update(frozen_reference(model, config, tokenizer))
    return extra


# --------------------------------------------------------------------------- rollout and loss


def _autocast(config: Any) -> bool | None:
    precision = config.hyperparameters.precision
    return None if precision == "auto" else precision == "bf16"


def rollout(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> dict[str, Any]:
    o = ctx.options
    g = o.num_generations
    tokenizer = ctx.tokenizer
    params = GenerationParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p, n=g)
    was_training = model.training
    model.eval()
    try:
        results = generate_batch(
            model, tokenizer, batch["prompts"], params, batch_size=64, autocast=_autocast(ctx.config)
        )
    finally:
        model.train(was_training)
    eos = tokenizer.eos_token_id
    completions = [
        # the end-of-turn token is part of what the policy chose, so it is trained too
        r.token_ids + ([eos] if r.completion_tokens > len(r.token_ids) and eos is not None else [])
        for r in results
    ]
    texts = [r.text for r in results]
    examples = [e for e in batch["examples"] for _ in range(g)]
    rewards = torch.zeros(len(texts))
    sums: dict[str, float] = {}
    for name, weight, score in ctx.extra["scorers"]:
        values = torch.tensor(score(texts, examples), dtype=torch.float32)
        rewards += weight * values
        sums[f"reward/{name}"] = float(values.sum())
    sums["reward"] = float(rewards.sum())
    sums["completion_length"] = float(sum(len(c) for c in completions))

    prompts = [p for p in batch["prompts"] for _ in range(g)]
    rows, labels = zip(
        *(completion_row(p, c) for p, c in zip(prompts, completions, strict=True)), strict=True
    )
    # The reference forward below runs before the loop moves batches: put this one beside the model.
    out = to_device(collate_rows(rows, labels, batch["pad_id"], batch["packed"]), model_device(model))
    out["advantages"] = group_advantages(rewards, g, scale=o.scale_rewards)
    if o.beta:
        out["ref_logps"] = reference_label_logps(model, out, ctx)
    n_completion_tokens = sum(len(c) for c in completions)
    out["n_units"] = {"grpo": len(rows), "dapo": n_completion_tokens, "bnpo": 1}[o.loss_type]
    out["rollout_sums"] = sums
    return out


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o = ctx.options
    logps = unpack_rows(label_logps(model, batch), batch)
    mask = unpack_rows((batch["labels"] != IGNORE).float(), batch)
    ref = unpack_rows(batch["ref_logps"], batch) if "ref_logps" in batch else None
    res = grpo_loss(
        logps,
        logps.detach(),
        ref,
        batch["advantages"],
        mask,
        epsilon_low=o.epsilon,
        epsilon_high=o.epsilon_high,
        beta=o.beta,
        loss_type=o.loss_type,
    )
    # The loop divides metric sums by the step's units: report per-completion means times this
    # micro-batch's units, so the logged value is the completions' mean whatever the loss type.
    units = batch["n_units"]
    per_unit = units / logps.shape[0]
    metrics = {k: v * per_unit for k, v in batch["rollout_sums"].items()}
    metrics.update({k: v * units for k, v in res.metrics.items()})
    return StepOutput(res.loss_sum, metrics)


GRPO = Objective(
    name="grpo",
    description="GRPO: online RL, G sampled completions per prompt scored by reward functions or a model.",
    options=GRPOOptions,
    data_kind="prompt",
    encode=encode,
    collate=collate,
    loss=loss,
    setup=setup,
    rollout=rollout,
)
register(GRPO)
