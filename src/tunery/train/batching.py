"""The run's schedule: which examples go into which optimizer step and micro-batch.

The schedule is a pure function of (lengths, seed, settings), so a resumed run replays exactly the
same steps. A step holds `batch_size` examples; its examples are split into micro-batches of at most
`micro_batch_tokens` tokens (one forward pass each), sorted by length so rows waste little padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    epoch: int
    index: int  # 1-based optimizer step
    micro_batches: tuple[tuple[int, ...], ...]  # example indices per forward pass


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def split_micro_batches(indices: list[int], lengths: list[int], token_budget: int) -> list[tuple[int, ...]]:
    """Greedy first-fit over length-sorted examples; an example longer than the budget goes alone."""
    ordered = sorted(indices, key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    loads: list[int] = []
    for i in ordered:
        for b, load in enumerate(loads):
            if load + lengths[i] <= token_budget:
                batches[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            batches.append([i])
            loads.append(lengths[i])
    return [tuple(b) for b in batches]


def schedule(
    lengths: list[int],
    *,
    batch_size: int,
    n_epochs: int,
    seed: int,
    token_budget: int,
    max_steps: int | None = None,
) -> list[Step]:
    n = len(lengths)
    steps: list[Step] = []
    for epoch in range(1, n_epochs + 1):
        order = epoch_order(n, seed, epoch)
        # The last step of an epoch may be smaller; the loss is normalised per unit, so it is unbiased.
        for start in range(0, n, batch_size):
            chunk = order[start : start + batch_size]
            steps.append(
                Step(epoch, len(steps) + 1, tuple(split_micro_batches(chunk, lengths, token_budget)))
            )
            if max_steps is not None and len(steps) >= max_steps:
                return steps
    return steps


def steps_per_epoch(steps: list[Step]) -> int:
    return sum(1 for s in steps if s.epoch == 1) or 1
