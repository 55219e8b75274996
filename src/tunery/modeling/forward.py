"""Forward passes shared by objectives.

`packed_inputs` lays the micro-batch's examples end to end in one row (no padding) with per-example
positions and boundaries for `tunery_packed` attention. `supervised_loss` runs the decoder,
then the LM head and cross-entropy only at supervised positions, in chunks, so the full
sequence-by-vocabulary logits tensor is never built (prompt tokens need no logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunery.data.types import IGNORE
from tunery.modeling.prefix import SHARED_PREFIX_ARG, trainable_prefix_length
from tunery.modeling.shapes import bucket
from tunery.models.unwrap import unwrap

LOGIT_CHUNK = 1024


def packed_inputs(
    rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None, share_prefix: bool = False
) -> dict:
    """One packed row: input_ids [1, L], position_ids [1, L], cu_seq_lens [n+1], labels [1, L] shifted.

    Labels are pre-shifted per example (label at t is the token t+1 of the same example), so the
    boundary between two packed examples never produces a cross-example target.

    `share_prefix`: a prefix that every row starts with and that scores nothing (modeling/prefix.py)
    is laid once, as the row's first segment, and each example follows without it, its positions
    continuing the prefix's; `shared_prefix` says how long it is, and packed attention lets every
    segment see it (modeling/attention.py).
    """
    shared = trainable_prefix_length(rows, labels) if share_prefix and labels is not None else 0
    ids: list[int] = list(rows[0][:shared])
    pos: list[int] = list(range(shared))
    tgt: list[int] = [IGNORE] * shared
    cu = [0, shared] if shared else [0]
    for k, row in enumerate(rows):
        ids.extend(row[shared:])
        pos.extend(range(shared, len(row)))
        if labels is not None:
            lab = list(labels[k])
            tgt.extend(lab[shared + 1 :] + [IGNORE])
        cu.append(len(ids))
    out = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "max_len": max(shared, *(len(r) - shared for r in rows)),
    }
    if labels is not None:
        out["labels"] = torch.tensor([tgt], dtype=torch.long)
    if shared:
        out["shared_prefix"] = shared
    return out


def padded_inputs(
    rows: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None
) -> dict:
    """Right-padded rows with a 2D attention mask; labels shifted per row like `packed_inputs`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row)
        mask[k, : len(row)] = 1
        if labels is not None:
            lab = list(labels[k])
            tgt[k, : len(row) - 1] = torch.tensor(lab[1:], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = tgt
    return out


def split_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of a causal LM, seen through peft wrappers; None if not separable."""
    # Prompt learning (peft) and methods flagged `tunery_full_forward` change the model's own
    # forward (virtual tokens, past key/values): calling the inner decoder would bypass them.
    peft_cfg = getattr(model, "active_peft_config", None)
    if getattr(peft_cfg, "is_prompt_learning", False) or getattr(model, "tunery_full_forward", False):
        return None
    base = unwrap(model)
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        return None
    cfg = getattr(base, "config", None)
    # Other logit scalings (Cohere's logit_scale multiplies, Granite's logits_scaling divides, ...)
    # take the model's own forward: one path that is right rather than one formula per family.
    if any(getattr(cfg, key, None) for key in _OTHER_LOGIT_SCALES):
        return None
    cap = getattr(cfg, "final_logit_softcapping", None)
    return get_decoder(), (SoftCappedHead(head, cap) if cap else head)


# Config fields under which transformers models rescale their logits after the LM head.
_OTHER_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


class SoftCappedHead(torch.nn.Module):
    """The LM head followed by the model's final soft-capping, `cap * tanh(logits / cap)` (Gemma 2),
    computed in the head's dtype as the model's forward does, so the supervised-only head gives the
    model's own logits and loss (tests/test_architectures.py)."""

    def __init__(self, head: torch.nn.Module, cap: float) -> None:
        super().__init__()
        self.head = head
        self.cap = float(cap)

    @property
    def out_features(self) -> int:
        return self.head.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def forward_kwargs(batch: dict) -> dict:
    """Arguments for a transformers forward on a packed row (segment boundaries for `tunery_packed`
    attention; an all-ones 2D mask so no dense 4D mask is built) or on padded rows."""
    ids = batch["input_ids"]
    if "cu_seq_lens" not in batch:
        return {"input_ids": ids, "attention_mask": batch.get("attention_mask"), "use_cache": False}
    shared = {SHARED_PREFIX_ARG: batch["shared_prefix"]} if batch.get("shared_prefix") else {}
    return {
        **shared,
        "input_ids": ids,
        "position_ids": batch["position_ids"],
        "attention_mask": torch.ones((1, ids.shape[1]), dtype=torch.long, device=ids.device),
        "cu_seq_lens_q": batch["cu_seq_lens"],
        "cu_seq_lens_k": batch["cu_seq_lens"],
        "max_length_q": batch["max_len"],
        "max_length_k": batch["max_len"],
        "use_cache": False,
    }


def run_decoder(decoder: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states of a decoder stack on a packed or padded batch."""
    out = decoder(**forward_kwargs(batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def decoder_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states of a causal LM's decoder (seen through peft wrappers)."""
    parts = split_lm(model)
    assert parts is not None
    return run_decoder(parts[0], batch)


def head_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed CE and #correct over rows of `hidden` [N, H] against `targets` [N], in chunks."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long)
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        h = hidden[start : start + LOGIT_CHUNK]
        t = targets[start : start + LOGIT_CHUNK]
        logits = head(h).float()
        ce = F.cross_entropy(logits, t, reduction="none")
        if weights is not None:
            ce = ce * weights[start : start + LOGIT_CHUNK]
        loss = loss + ce.sum()
        correct += (logits.argmax(-1) == t).sum().detach().cpu()
    return loss, correct, int(targets.numel())


def supervised_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed CE, #correct, #tokens) over supervised positions only.

    A batch flagged `full_head` applies the LM head at every position (prompt tokens too), as stock
    trainers do: the benchmark's lever (train/levers.py), to measure what this saves."""
    labels = batch["labels"]
    parts = split_lm(model)
    if parts is None or batch.get("generic"):
        return generic_loss(model, batch)
    hidden = decoder_hidden(model, batch)
    sel = labels != IGNORE
    if batch.get("full_head"):  # ignored targets add 0 to the loss and never count as correct
        loss, correct, _ = head_loss(parts[1], hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
        return loss, correct, int(sel.sum())
    h, targets = hidden[sel], labels[sel]
    n = targets.numel()
    if batch.get("bucketed"):  # the head's rows vary per step too: pad them to a bucket (shapes.py)
        extra = bucket(n) - n
        h = torch.cat([h, h.new_zeros(extra, h.shape[-1])])
        targets = torch.cat([targets, targets.new_full((extra,), IGNORE)])
    loss, correct, _ = head_loss(parts[1], h, targets)  # IGNORE rows add 0 and are never correct
    return loss, correct, n


def generic_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-logits path: methods that change the forward (prompt learning, on padded rows) and
    architectures whose logits Tunery's head does not reproduce (see `split_lm`)."""
    # forward_kwargs keeps a packed row's boundaries: without them its examples would attend to each other.
    logits = model(**forward_kwargs(batch)).logits
    labels = batch["labels"]
    if logits.shape[1] != labels.shape[1]:  # virtual tokens prepended by prompt-learning methods
        logits = logits[:, -labels.shape[1] :]
    sel = labels != IGNORE
    lg = logits[sel].float()
    t = labels[sel]
    return F.cross_entropy(lg, t, reduction="sum"), (lg.argmax(-1) == t).sum().detach().cpu(), int(t.numel())
