"""A prefix common to every row of a batch, computed once instead of once per row.

Chat data repeats itself at the front: a system prompt (SmolLM2's template adds one to every
conversation), the user turn's header, few-shot examples, the n samples of one prompt. Generation
prefills such a prefix once per batch (generation/generate.py); training lays it once at the head
of a packed row, and every example after it attends to it as if it were its own start
(modeling/attention.py). Both are exact: the same keys and values, at the same positions. Training
never shares where a loss averages over every token run (MoE balancing: train/setup.py::speedups).
"""

from __future__ import annotations

from collections.abc import Sequence

from tunery.data.types import IGNORE

# Fewer shared tokens than this are computed per row: generation's extra forward call would cost
# about what it saves. The quickstart's system prompt is 28 tokens (bench/shared_prefix.py).
MIN_SHARED_PREFIX = 16

# The keyword that carries a packed row's shared prefix length to packed attention: transformers
# passes a forward's extra keywords down to each layer's attention function.
SHARED_PREFIX_ARG = "tunery_shared_prefix"


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `rows` have in common, leaving each at least one token of its own
    (the step that yields its first logits, or a segment of its own in a packed row)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def trainable_prefix_length(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> int:
    """The prefix that several training rows may share: common to all, at least
    `MIN_SHARED_PREFIX` tokens, and scoring nothing. A shared position has one hidden state for all
    rows, so it may not carry a target: labels are shifted (position t scores `labels[t + 1]`), so
    `labels[1..P]` must all be IGNORE. 0 when there is no such prefix."""
    if len(rows) < 2:
        return 0
    n = shared_prefix_length(rows)
    for lab in labels:
        k = 0
        while k < n and lab[k + 1] == IGNORE:
            k += 1
        n = k
    return n if n >= MIN_SHARED_PREFIX else 0
