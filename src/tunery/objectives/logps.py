"""Log-probabilities of labels, from logits or from final hidden states and the LM head (chunked).

Aligned as the losses expect (`objectives/losses.py`): `logits[b, t]` scores `labels[b, t]`; for a
causal LM the caller shifts once. Positions labelled `IGNORE_INDEX` score 0 and are not counted. The
parity tests in `tests/test_losses.py` hold them to TRL's `get_batch_logps` within 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunery.data.types import IGNORE as IGNORE_INDEX


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token `log softmax(logits / temperature)[label]`, 0 where `labels == ignore_index`.

    `logits` is `[B, T, V]`, `labels` `[B, T]`, aligned (no shift here). Computed in float32 as
    `logit[label] - logsumexp(logits)`, one sequence at a time so a bf16 batch never gets a full
    float32 copy of its logits.
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    rows = []
    for row_logits, row_labels in zip(logits, safe, strict=True):
        row = row_logits.float()
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows).masked_fill(~mask, 0.0)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each sequence's labelled tokens: `(sum or mean of log p(label), n_tokens)`.

    `logits` `[B, T, V]` and `labels` `[B, T]` are aligned: the caller shifts (`logits[:, :-1]`,
    `labels[:, 1:]`). `n_tokens` `[B]` counts the labelled tokens; a sequence with none gets 0 (not
    NaN) for its mean. Same quantity as TRL's `get_batch_logps` after its internal shift.
    """
    per_token = token_logps(logits, labels, ignore_index)
    n_tokens = (labels != ignore_index).sum(-1)
    total = per_token.sum(-1)
    if average:
        total = total / n_tokens.clamp(min=1)
    return total, n_tokens


def _head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """`token_logps` from the final hidden states and the LM head, without the full logits.

    `hidden` `[B, T, H]` and `labels` `[B, T]` are aligned like `token_logps` (pass `hidden[:, :-1]`
    and `labels[:, 1:]`); `weight` is the `[V, H]` LM head. Only labelled positions are projected
    (prompt tokens cost nothing; docs/performance.md, "Levers"), `chunk_size` of them at a time, and each
    chunk runs under activation checkpointing so its `[chunk, V]` logits are rebuilt in backward
    instead of kept: peak memory is one chunk of logits. `logit_scale` and `softcap` reproduce the
    models that scale or soft-cap their logits (Cohere, Gemma 2); the default is a plain head.
    """
    mask = labels != ignore_index
    flat_hidden = hidden[mask]
    targets = labels[mask]
    needs_grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        args = (flat_hidden[start : start + chunk_size], weight, bias, targets[start : start + chunk_size])
        extra = (temperature, logit_scale, softcap)
        if needs_grad:
            pieces.append(checkpoint(_head_logps, *args, *extra, use_reentrant=False))
        else:
            pieces.append(_head_logps(*args, *extra))
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if not pieces:
        # keep the graph connected so an all-masked micro-batch still backpropagates a zero
        return out + 0.0 * hidden.sum()
    return out.masked_scatter(mask, torch.cat(pieces))


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    chunk_size: int = 1024,
    **head_options: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` computed through `token_logps_from_hidden` (same alignment and returns)."""
    per_token = token_logps_from_hidden(
        hidden, weight, labels, bias, ignore_index, chunk_size, **head_options
    )
    n_tokens = (labels != ignore_index).sum(-1)
    total = per_token.sum(-1)
    if average:
        total = total / n_tokens.clamp(min=1)
    return total, n_tokens
