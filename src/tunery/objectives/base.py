"""The shape every objective has. The single training loop calls, for each micro-batch:

    features = objective.encode(example, tokenizer, config)      # once, cached
    batch    = objective.collate(list_of_features, pad_id, packed) # tensors; batch["n_units"] is an int
    out      = objective.loss(model, batch, ctx)                  # StepOutput

`n_units` is what the loss is averaged over (supervised tokens for SFT, pairs for DPO). The loop
sums `n_units` over all micro-batches of an optimizer step first and divides every micro-batch's
`loss_sum` by that total, so gradient accumulation equals one big batch exactly.

`encode` may also return a list of features (pretraining splits a long document into
`max_length` chunks, each its own example). Online objectives (GRPO) have a `rollout` hook that the
loop calls on every collated micro-batch of a step before it sums `n_units`: their units (sampled
completions or their tokens) exist only after generation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:  # torch is imported where tensors are made, not to import the registry
    import torch


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # summed over the micro-batch's units (differentiable)
    metrics: dict[str, float] = field(default_factory=dict)  # sums over units; the loop averages


@dataclass
class Context:
    """What an objective may use besides the model and the batch."""

    config: Any  # TuneryConfig
    options: BaseModel  # this objective's options
    tokenizer: Any
    # A context manager under which `model` behaves as the frozen reference (adapter disabled).
    reference: Callable[[], AbstractContextManager] = nullcontext
    step: int = 0
    total_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Objective:
    name: str
    description: str
    options: type[BaseModel]
    # which Dataset.kind the objective trains on; the loader converts or refuses
    data_kind: str
    encode: Callable[[Any, Any, Any], dict[str, Any] | None]
    # collate(features, pad_id, packed): packed=True lays examples end to end in one row
    collate: Callable[[list[dict[str, Any]], int, bool], dict[str, Any]]
    loss: Callable[[torch.nn.Module, dict[str, Any], Context], StepOutput]
    # tokens per feature row, for batching by token budget
    length: Callable[[dict[str, Any]], int] = lambda f: len(f["input_ids"])
    # the loss sums over labelled tokens only, so trailing positions labelled IGNORE change nothing
    # and the loop may pad lengths to shape buckets (modeling/shapes.py)
    token_level: bool = False
    # collate also takes `share_prefix=True`: a packed micro-batch lays the unscored prefix that all
    # its rows start with once (modeling/prefix.py); the loop asks for it where attention allows
    shares_prefix: bool = False
    # optional hook: setup(model, config, tokenizer) -> dict stored in ctx.extra (teacher, reward fns)
    setup: Callable[[torch.nn.Module, Any, Any], dict[str, Any]] | None = None
    # optional: rollout(model, batch, ctx) -> batch with tensors and its final n_units (GRPO samples
    # completions here, so its units are known only afterwards); called before any loss of the step
    rollout: Callable[[torch.nn.Module, dict[str, Any], Context], dict[str, Any]] | None = None
    # optional: head(config, load) -> (model, head module names), for objectives that train a new
    # head instead of the LM head (reward: one score, classify: one logit per label). `load(**kw)`
    # loads the base as the recipe would (the method's from_pretrained kwargs included), `kw` winning
    # (e.g. task="sequence-classification"); the head's modules train in full under any method and
    # are saved with it (added to `modules_to_save` / `freeze.modules`)
    head: Callable[[Any, Callable[..., torch.nn.Module]], tuple[torch.nn.Module, list[str]]] | None = None
    # optional: save_info(model, config) -> extra keys for the saved tunery.json (classify: labels)
    save_info: Callable[[torch.nn.Module, Any], dict[str, Any]] | None = None
