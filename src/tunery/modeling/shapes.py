"""Round micro-batch lengths up to a few bucket sizes, where every new shape costs memory for good.

Under bf16 autocast on a CPU, oneDNN builds (and keeps) kernels and buffers for every new input
shape: measured here, a bf16 MLP forward+backward over 300 distinct lengths grew RSS from 250 to
1,150 MB, with the primitive cache off too, while fp32 stayed flat. Packed training makes nearly
every step a new length, so a long run grew without bound. Rounding lengths to buckets caps the
number of shapes (about 40 up to 4,096 tokens) and the memory with it; measured the same way,
bucketed lengths stayed within 60 MB.

The supervised-only LM head sees only the labelled positions, another length that changes every
step, so `supervised_loss` pads those rows to a bucket as well (zero rows with IGNORE targets).

Only token-level objectives are bucketed (`Objective.token_level`): their loss sums over labelled
tokens, so trailing positions labelled `IGNORE` change nothing. The pad tokens go at the end of
the last row (packed) or of every row (padded): causal attention never lets an earlier token see
them, so every real token's output is exactly what it was.
"""

from __future__ import annotations

from typing import Any

import torch

from tunery.data.types import IGNORE


def bucket(n: int) -> int:
    """`n` rounded up: multiples of 16 to 256 tokens, of 64 to 1,024, then of 256."""
    step = 16 if n <= 256 else 64 if n <= 1024 else 256
    return -(-n // step) * step


def pad_to_bucket(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """The batch with its sequence dimension padded to `bucket(length)`; counts are unchanged."""
    ids = batch["input_ids"]
    extra = bucket(ids.shape[1]) - ids.shape[1]
    out = {**batch, "bucketed": True}  # the supervised head buckets its rows too (forward.py)
    if extra == 0:
        return out
    out["input_ids"] = _extend(ids, extra, pad_id)
    if "labels" in batch:
        out["labels"] = _extend(batch["labels"], extra, IGNORE)
    if "attention_mask" in batch:  # padded rows: the new columns are masked out
        out["attention_mask"] = _extend(batch["attention_mask"], extra, 0)
    if "cu_seq_lens" in batch:  # packed: the last example grows by `extra` positions
        last = int(batch["position_ids"][0, -1]) + 1
        tail = torch.arange(last, last + extra, dtype=batch["position_ids"].dtype)[None]
        out["position_ids"] = torch.cat([batch["position_ids"], tail], dim=1)
        cu = batch["cu_seq_lens"].clone()
        cu[-1] += extra
        out["cu_seq_lens"] = cu
        out["max_len"] = max(batch["max_len"], last + extra)
    return out


def _extend(t: torch.Tensor, extra: int, value: int) -> torch.Tensor:
    return torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)
