"""Attention over packed rows: each example attends only to itself.

Position ids alone do not isolate packed examples (see docs/performance.md, "Levers"), and a dense 4D
block mask makes SDPA pay for the whole packed length squared. Instead the loop passes the
boundaries (`cu_seq_lens_q`, as flash-attention does) and this attention runs causal SDPA once per
segment, so the cost is what the examples would cost unpacked, with no padding.

On a GPU the same boundaries go to a varlen kernel instead (flash-attention's
`flash_attn_varlen_func` when installed, else PyTorch's `varlen_attn`): one call per layer for the
whole row, with the boundaries already on the device and the longest example's length an int from
the collator, so no layer waits for the host (the per-segment path reads the boundaries back with
`.tolist()` in every layer, which on a GPU is a sync per layer). tests/test_packing.py checks that
the varlen layout gives the per-segment path's logits.

Architectures pass two more things through the attention call, and every path honours them:
`sliding_window` (Mistral, Phi-3, the local layers of Gemma 2/3: a query sees itself and the
`window - 1` keys before it, as transformers' masks define it) and `softcap` (Gemma 2:
`cap * tanh(scores / cap)` before the softmax, which SDPA cannot do, so those layers run an explicit
softmax). tests/test_architectures.py checks packed against unpacked logits for each architecture
with a window shorter than the examples.

A packed row may begin with a prefix that all its examples share (`tunery_shared_prefix` > 0, set by
`modeling/forward.py::packed_inputs`; modeling/prefix.py says when): segment 0 is then that prefix,
computed once, and every later segment's queries see the prefix's keys and values in front of their
own, at the positions they would have in the whole example, windows included. A shared row takes the
per-segment path (or the dense mask, in "mask" mode), never the varlen kernels.
tests/test_architectures.py checks the loss and every gradient against whole examples.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from tunery.modeling.prefix import SHARED_PREFIX_ARG

log = logging.getLogger(__name__)

NAME = "tunery_packed"
# How packed rows are isolated: "auto" (the default: "varlen" on a GPU for half-precision inputs,
# else "segments"), "segments" (causal SDPA per example), "varlen" (one varlen-kernel call for the
# row) or "mask" (one SDPA call with a dense 4D block-diagonal causal mask). The explicit modes
# exist so the benchmark can measure the levers (train/levers.py); all are exact
# (tests/test_packing.py, tests/test_perf_levers.py). Each mode is its own registered attention
# name, so the mode travels with the model (`use_packed_attention(model, mode)`), not in a global.
MODES = ("auto", "segments", "varlen", "mask")
_HALF = (torch.float16, torch.bfloat16)


def block_causal_mask(
    cu: torch.Tensor, length: int, shared: int = 0, window: int | None = None
) -> torch.Tensor:
    """[1, 1, L, L] boolean mask, True where a token may attend: same example and not in the future.

    `shared` > 0: the first segment is a prefix every example sees as its own start (modeling/prefix.py).
    `window`: a query sees itself and the `window - 1` positions before it, counted in its example."""
    cu = cu.to(torch.long)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), torch.diff(cu))
    row = torch.arange(length, device=cu.device)
    visible = seg[:, None] == seg[None, :]
    if shared:
        visible = visible | (seg[None, :] == 0)
    mask = visible & (row[:, None] >= row[None, :])
    if window is not None:
        pos = row - cu[seg] + shared * (seg > 0)  # the position within the example
        mask = mask & ((pos[:, None] - pos[None, :]) < window)
    return mask[None, None]


def attention_name(mode: str = "auto") -> str:
    """The registered attention name of a mode: "tunery_packed" for auto, "tunery_packed_<mode>" else."""
    if mode not in MODES:
        raise ValueError(f"unknown packed attention mode {mode!r}; expected one of {MODES}")
    return NAME if mode == "auto" else f"{NAME}_{mode}"


def packed_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, mode: str = "auto", **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    shared = int(kwargs.pop(SHARED_PREFIX_ARG, 0) or 0)
    training_dropout = dropout if module.training else 0.0
    if cu is None or query.shape[0] != 1:
        if softcap is None:  # SDPA's mask (built by the model) already carries any window
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        mask = attention_mask if attention_mask is not None else _band(query.shape[2], window, query.device)
        return _explicit_attention(query, key, value, mask, scaling, training_dropout, softcap), None
    # Grouped-query heads are shared inside SDPA (enable_gqa) rather than copied with
    # repeat_interleave: same result, no [heads, L, d] key/value copies, ~25% faster fwd+bwd on CPU.
    gqa = query.shape[1] != key.shape[1]
    if mode == "mask":
        mask = block_causal_mask(cu, query.shape[2], shared, window)
        if softcap is not None:
            return _explicit_attention(query, key, value, mask, scaling, training_dropout, softcap), None
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, dropout_p=training_dropout, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous(), None
    # A shared prefix takes the per-segment path: the varlen kernels see one segment per query.
    if not shared and _use_varlen(query, training_dropout, softcap, mode):
        max_len = kwargs.get("max_length_q")
        return varlen_attention(query, key, value, cu, max_len, scaling, gqa, window, softcap), None
    # split, not slicing: the backward of a slice writes its gradient into a zero tensor of the
    # whole row, once per example, where split's backward is a single concatenation.
    sizes = torch.diff(cu).tolist()
    segments = list(zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True))
    if shared:  # every example's keys and values start with the prefix's (segment 0)
        _, pk, pv = segments[0]
        segments[1:] = [(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for q, k, v in segments[1:]]
    outs = [
        causal_attention(q, k, v, scaling, training_dropout, window, softcap).transpose(1, 2)
        for q, k, v in segments
    ]
    return torch.cat(outs, dim=1), None  # [1, L, heads, d], contiguous: one copy instead of two


def causal_attention(q, k, v, scale, dropout: float, window: int | None, softcap: float | None):
    """Causal attention of one example `[1, heads, n, d]` (keys may have fewer heads); `[1, heads, n, d]`.

    Keys may be longer than the queries (a shared prefix in front): the queries are then the last `n`
    positions. SDPA's causal kernel where it applies (its causal mask aligns top-left, so only for
    equal lengths); a band mask when the window is shorter than the example or the lengths differ;
    an explicit softmax for soft-capped scores."""
    n, total = q.shape[2], k.shape[2]
    if softcap is not None:
        band = _band(total, window, q.device)[total - n :]
        return _explicit_attention(q, k, v, band, scale, dropout, softcap).transpose(1, 2)
    # is_causal is SDPA's fast path; a window shorter than the example needs the band as a mask.
    plain = total == n and (window is None or n <= window)
    mask = None if plain else _band(total, window, q.device)[total - n :]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=plain,
        scale=scale,
        dropout_p=dropout,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _band(n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, n] causal mask, limited to the last `window` positions (the query's own included)."""
    pos = torch.arange(n, device=device)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff < window) if window is not None else diff >= 0


def _explicit_attention(q, k, v, mask, scale, dropout: float, softcap: float) -> torch.Tensor:
    """Soft-capped attention as Gemma 2's reference computes it; `mask` is boolean (True attends) or
    additive. Returns `[batch, n, heads, d]`, the attention-interface layout."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., : k.shape[2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return (probs @ v).transpose(1, 2).contiguous()


def _use_varlen(
    query: torch.Tensor, dropout: float, softcap: float | None = None, mode: str = "auto"
) -> bool:
    if mode == "varlen":
        return True
    # The GPU kernels take fp16/bf16 only and have no attention dropout, and PyTorch's has no
    # soft-capping; anything else keeps the per-segment path.
    return (
        mode == "auto"
        and query.device.type == "cuda"
        and query.dtype in _HALF
        and not dropout
        and (softcap is None or _has_flash_attn())
    )


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    max_len: int | None,
    scaling: float | None,
    gqa: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of a packed row `[1, heads, L, d]` in one varlen call; returns `[1, L, heads, d]`.

    The kernels take `[tokens, heads, d]` and the int32 boundaries; `max_len` (the collator's, a
    host int) saves them a device-to-host read of the longest example."""
    if max_len is None:  # a caller that passed no length: one sync for the row, still not per segment
        max_len = int(torch.diff(cu).max())
    cu = cu.to(device=query.device, dtype=torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, heads, d], views
    kernel = _varlen_kernel(q.device, softcap)
    out = kernel(q, k, v, cu, max_len, scaling, gqa, window, softcap)
    return out[None]


def _varlen_kernel(device: torch.device, softcap: float | None = None):
    """flash-attention's varlen kernel when installed, else PyTorch's (both CUDA); on a CPU, or for
    soft-capping without flash-attention, a per-segment reference with the same signature, so the
    layout code is checked without a GPU."""
    if device.type != "cuda":
        return _reference_varlen
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        if softcap is not None:
            return _reference_varlen
        from torch.nn.attention.varlen import varlen_attn

        def torch_varlen(q, k, v, cu, max_len, scale, gqa, window, softcap):
            # window_size counts the keys before the query; transformers' window includes the query
            left = -1 if window is None else window - 1
            return varlen_attn(
                q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(left, 0), enable_gqa=gqa
            )

        return torch_varlen

    def flash_varlen(q, k, v, cu, max_len, scale, gqa, window, softcap):  # flash-attention shares GQA heads
        left = -1 if window is None else window - 1
        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu,
            cu,
            max_len,
            max_len,
            softmax_scale=scale,
            causal=True,
            window_size=(left, 0),
            softcap=softcap or 0.0,
        )

    return flash_varlen


def _reference_varlen(q, k, v, cu, max_len, scale, gqa, window=None, softcap=None):
    sizes = torch.diff(cu).tolist()
    outs = []
    for a, b, c in zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
        a, b, c = (t.transpose(0, 1)[None] for t in (a, b, c))  # [1, heads, n, d]
        outs.append(causal_attention(a, b, c, scale, 0.0, window, softcap)[0].transpose(0, 1))
    return torch.cat(outs)


def register(mode: str = "auto") -> str:
    """Register the attention of `mode` (and SDPA's mask builder for when no boundaries are passed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = attention_name(mode)
    fn = packed_attention if mode == "auto" else functools.partial(packed_attention, mode=mode)
    AttentionInterface.register(name, fn)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def packed_refusal(config) -> str | None:
    """Why packed attention cannot run this config exactly, or None when it can."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not packed"
    # The packed paths are causal (with an optional window) and nothing else.
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional (use_bidirectional_attention)"
    if getattr(config, "attention_chunk_size", None):
        return "its attention is chunked (attention_chunk_size)"
    return None


def use_packed_attention(model: torch.nn.Module, mode: str = "auto") -> bool:
    """Switch a transformers model to packed attention (isolating examples as `mode` says); False
    when the architecture can't."""
    name = register(mode)
    config = getattr(model, "config", None)
    if config is None:
        return False
    reason = packed_refusal(config)
    if reason is not None:
        log.info("Packed attention is off for %s: %s.", getattr(config, "model_type", "?"), reason)
        return False
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        log.info("Packed attention is off for %s: %s", getattr(config, "model_type", "?"), exc)
        return False
    return True
