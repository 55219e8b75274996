"""Attention over packed rows: each example attends only to itself.

Position ids alone do not isolate packed examples (see docs/performance-notes), and a dense 4D
block mask makes SDPA pay for the whole packed length squared. Instead the loop passes the
boundaries (`cu_seq_lens_q`, as flash-attention does) and this attention runs causal SDPA once per
segment, so the cost is what the examples would cost unpacked, with no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunery_packed"
# How packed rows are isolated: "segments" (causal SDPA per example, the default) or "mask" (one SDPA
# call with a dense 4D block-diagonal causal mask). "mask" exists so the benchmark can measure the
# lever; both are exact (tests/test_packing.py, tests/test_perf_levers.py).
MODE = "segments"


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
