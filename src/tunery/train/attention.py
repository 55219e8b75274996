"""Attention over packed rows: each example attends only to itself.

Position ids alone do not isolate packed examples (see docs/performance-notes), and a dense 4D
block mask makes SDPA pay for the whole packed length squared. Instead the loop passes the
boundaries (`cu_seq_lens_q`, as flash-attention does) and this attention runs causal SDPA once per
segment, so the cost is what the examples would cost unpacked, with no padding.

On a GPU the same boundaries go to a varlen kernel instead (flash-attention's
`flash_attn_varlen_func` when installed, else PyTorch's `varlen_attn`): one call per layer for the
whole row, with the boundaries already on the device and the longest example's length an int from
the collator, so no layer waits for the host (the per-segment path reads the boundaries back with
`.tolist()` in every layer, which on a GPU is a sync per layer). tests/test_packing.py checks that
the varlen layout gives the per-segment path's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunery_packed"
# How packed rows are isolated: "auto" (the default: "varlen" on a GPU for half-precision inputs,
# else "segments"), "segments" (causal SDPA per example), "varlen" (one varlen-kernel call for the
# row) or "mask" (one SDPA call with a dense 4D block-diagonal causal mask). The explicit modes
# exist so the benchmark can measure the levers; all are exact (tests/test_packing.py,
# tests/test_perf_levers.py).
MODE = "auto"
_HALF = (torch.float16, torch.bfloat16)


def block_causal_mask(cu: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, L, L] boolean mask, True where a token may attend: same example and not in the future."""
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), torch.diff(cu.long()))
    pos = torch.arange(length, device=cu.device)
    return ((seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # Grouped-query heads are shared inside SDPA (enable_gqa) rather than copied with
    # repeat_interleave: same result, no [heads, L, d] key/value copies, ~25% faster fwd+bwd on CPU.
    gqa = query.shape[1] != key.shape[1]
    if MODE == "mask":
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=block_causal_mask(cu, query.shape[2]),
            scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2).contiguous(), None
    training_dropout = dropout if module.training else 0.0
    if _use_varlen(query, training_dropout):
        return varlen_attention(query, key, value, cu, kwargs.get("max_length_q"), scaling, gqa), None
    # split, not slicing: the backward of a slice writes its gradient into a zero tensor of the
    # whole row, once per example, where split's backward is a single concatenation.
    sizes = torch.diff(cu).tolist()
    segments = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)
    outs = [
        F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=gqa,
        ).transpose(1, 2)
        for q, k, v in segments
    ]
    return torch.cat(outs, dim=1), None  # [1, L, heads, d], contiguous: one copy instead of two


def _use_varlen(query: torch.Tensor, dropout: float) -> bool:
    if MODE == "varlen":
        return True
    # The GPU kernels take fp16/bf16 only and have no attention dropout; anything else keeps SDPA.
    return MODE == "auto" and query.device.type == "cuda" and query.dtype in _HALF and not dropout


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    max_len: int | None,
    scaling: float | None,
    gqa: bool,
) -> torch.Tensor:
    """Causal attention of a packed row `[1, heads, L, d]` in one varlen call; returns `[1, L, heads, d]`.

    The kernels take `[tokens, heads, d]` and the int32 boundaries; `max_len` (the collator's, a
    host int) saves them a device-to-host read of the longest example."""
    if max_len is None:  # a caller that passed no length: one sync for the row, still not per segment
        max_len = int(torch.diff(cu).max())
    cu = cu.to(device=query.device, dtype=torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, heads, d], views
    out = _varlen_kernel(q.device)(q, k, v, cu, max_len, scaling, gqa)
    return out[None]


def _varlen_kernel(device: torch.device):
    """flash-attention's varlen kernel when installed, else PyTorch's (both CUDA); on a CPU a
    per-segment reference with the same signature, so the layout code is checked without a GPU."""
    if device.type != "cuda":
        return _reference_varlen
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        from torch.nn.attention.varlen import varlen_attn

        def torch_varlen(q, k, v, cu, max_len, scale, gqa):
            return varlen_attn(
                q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), enable_gqa=gqa
            )

        return torch_varlen

    def flash_varlen(q, k, v, cu, max_len, scale, gqa):  # flash-attention shares GQA heads itself
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)

    return flash_varlen


def _reference_varlen(q, k, v, cu, max_len, scale, gqa):
    sizes = torch.diff(cu).tolist()
    outs = [
        F.scaled_dot_product_attention(
            a.transpose(0, 1),
            b.transpose(0, 1),
            c.transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        ).transpose(0, 1)
        for a, b, c in zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
    ]
    return torch.cat(outs)


def register() -> str:
    """Register the attention (and SDPA's mask builder for when no boundaries are passed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model to packed attention; False when the architecture can't."""
    register()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
