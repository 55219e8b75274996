"""Forward helpers shared by the objectives beyond SFT: rows of prompt + completion, per-row
log-probabilities, and the frozen reference.

A "row" is one prompt + completion sequence. Collated rows are packed end to end (one segment
each, attention isolated per segment) or right-padded, exactly as SFT batches are, and labels are
pre-shifted per row (`modeling/forward.py`), so the hidden state at position t scores `labels[t]`.
Only labelled (completion) positions go through the LM head, in checkpointed chunks: prompt tokens
never cost a vocabulary projection and the full logits tensor is never built.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tunery.data import encode_pair
from tunery.modeling.forward import (
    IGNORE,
    decoder_hidden,
    forward_kwargs,
    packed_inputs,
    padded_inputs,
    run_decoder,
    split_lm,
)
from tunery.objectives.base import Context

LOGIT_CHUNK = 1024


# --------------------------------------------------------------------------- batches of rows


def completion_row(prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + completion with only the completion labelled."""
    return [*prompt, *completion], [IGNORE] * len(prompt) + list(completion)


def collate_rows(
    rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, pad_id: int, packed: bool
) -> dict[str, Any]:
    batch = packed_inputs(rows, labels) if packed else padded_inputs(rows, pad_id, labels)
    batch["n_rows"] = len(rows)
    batch["n_tokens"] = sum(len(r) for r in rows)
    return batch


def last_token_hidden(base: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """`[n_rows, hidden]`: the decoder's hidden state at each row's last real token, the pooling of
    the reward and classification heads (a causal decoder has seen the whole row only there)."""
    hidden = run_decoder(getattr(base, base.base_model_prefix), batch)
    if "cu_seq_lens" in batch:
        return hidden[0, batch["cu_seq_lens"][1:].long() - 1]
    ends = batch["attention_mask"].sum(-1) - 1  # rows are right-padded
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]


def encode_pair_features(example: Any, tokenizer: Any, config: Any) -> dict[str, Any]:
    return encode_pair(example, tokenizer, config.hyperparameters.max_length)


def pair_length(f: dict[str, Any]) -> int:
    return 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])


def collate_pairs(features: list[dict[str, Any]], pad_id: int, packed: bool) -> dict[str, Any]:
    """All chosen rows first, then all rejected rows (row i and row n+i are one pair); units = pairs."""
    rows, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            ids, lab = completion_row(f["prompt_ids"], f[key])
            rows.append(ids)
            labels.append(lab)
    batch = collate_rows(rows, labels, pad_id, packed)
    batch["n_pairs"] = len(features)
    batch["n_units"] = len(features)
    return batch


# --------------------------------------------------------------------------- forward passes


def full_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own forward (methods that change it, heads that post-process logits)."""
    ids = batch["input_ids"]
    out = model(**forward_kwargs(batch))
    logits = out.logits
    if logits.shape[1] != ids.shape[1]:  # virtual tokens prepended by prompt-learning methods
        logits = logits[:, -ids.shape[1] :]
    return logits


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def label_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """log p(labels[t]) at every labelled position, 0 elsewhere; the shape of `batch["labels"]`."""
    labels = batch["labels"]
    mask = labels != IGNORE
    parts = split_lm(model)
    if parts is None or batch.get("generic"):
        logits = full_logits(model, batch).float()
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(~mask, 0.0)
    hidden = decoder_hidden(model, batch)[mask]
    targets = labels[mask]
    pieces = []
    for start in range(0, targets.numel(), LOGIT_CHUNK):
        args = (parts[1], hidden[start : start + LOGIT_CHUNK], targets[start : start + LOGIT_CHUNK])
        if torch.is_grad_enabled() and hidden.requires_grad:
            # rebuild each chunk's [chunk, vocab] logits in backward instead of keeping them
            pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*args))
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if not pieces:
        return out
    return out.masked_scatter(mask, torch.cat(pieces))


def segment_ids(batch: dict[str, Any]) -> torch.Tensor:
    """Row index of every position of a packed batch."""
    cu = batch["cu_seq_lens"].long()
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1])


def per_row(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of `values` (shaped like the batch's ids) over each row: `[n_rows]`."""
    if "cu_seq_lens" in batch:
        seg = segment_ids(batch)
        return values.new_zeros(len(batch["cu_seq_lens"]) - 1).index_add(0, seg, values[0])
    return values.sum(-1)


def unpack_rows(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """`[n_rows, longest]` right-padded with zeros: packed `[1, L]` values laid out per row."""
    if "cu_seq_lens" not in batch:
        return values
    lengths = (batch["cu_seq_lens"][1:] - batch["cu_seq_lens"][:-1]).tolist()
    return torch.nn.utils.rnn.pad_sequence(list(values[0].split(lengths)), batch_first=True)


def row_logps(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each row's labelled tokens, their count), both `[n_rows]`."""
    logps = label_logps(model, batch)
    counts = per_row((batch["labels"] != IGNORE).float(), batch)
    return per_row(logps, batch), counts


# --------------------------------------------------------------------------- the reference


def frozen_reference(model: torch.nn.Module, config: Any, tokenizer: Any) -> dict[str, Any]:
    """`setup` hook of objectives with a reference. Adapter methods need nothing: the reference is
    the same model with the adapter disabled (`ctx.reference`). A fully trained model changes the
    base itself, so the reference has to be a frozen copy taken before the first step."""
    if hasattr(model, "disable_adapter"):
        return {}
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return {"reference_model": ref}


@torch.no_grad()
def reference_label_logps(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> torch.Tensor:
    ref = ctx.extra.get("reference_model")
    if ref is not None:
        return label_logps(ref, batch)
    with ctx.reference():
        return label_logps(model, batch)


def reference_row_logps(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> torch.Tensor:
    return per_row(reference_label_logps(model, batch, ctx), batch)
