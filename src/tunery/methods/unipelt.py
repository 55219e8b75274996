"""`unipelt`: UniPELT (Mao et al., 2022), implemented here. Three submodules in every decoder layer,
each scaled by its own learned gate computed from its input, g = sigmoid(W x + b):

- LoRA on the query and value projections: q = W_q x + g_L(x) * (alpha/r) B A x;
- prefix tuning: learned key/value prefixes in attention whose contribution to each token's
  output is scaled by g_P computed from the attention input;
- a bottleneck adapter after the MLP: h + g_A(h) * up(act(down(h))).

The prefix needs an attention that sees extra keys for every query. Packed rows go through
per-segment attention that knows nothing of prefixes, so this method uses its own attention
(`tunery_unipelt`) and padded rows (`supports_packing=False`). That attention splits the output
into the part from the tokens and the part from the prefix in one SDPA call (the values are
[0; V] and [P_v; 0] side by side), so the gate scales the prefix part per token exactly.
The LoRA and adapter parts run from forward hooks; the model's structure stays unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError
from tunery.methods import native, register
from tunery.methods.adapter import Bottleneck
from tunery.methods.base import Method, MoeBlock
from tunery.methods.layers import (
    ATTENTION_NAMES,
    MLP_NAMES,
    decoder_layers,
    float_dtype,
    map_output,
    sublayer,
)

MARK = "tunery_unipelt"
ATTENTION = "tunery_unipelt"
Component = Literal["lora", "prefix", "adapter"]


class UniPeltOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    components: list[Component] = Field(
        default_factory=lambda: ["lora", "prefix", "adapter"], description="Which submodules to use."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank on q_proj and v_proj.")
    lora_alpha: float = Field(16, description="LoRA scale numerator (scale = alpha/r).")
    prefix_tokens: int = Field(10, ge=1, description="Learned key/value prefix length per layer.")
    reduction_factor: int = Field(16, ge=1, description="Adapter bottleneck = hidden size / this.")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Adapter activation.")
    moe: MoeBlock


class Gate(torch.nn.Module):
    """sigmoid(w.x + b), one scalar per token; starts at 0.5 like the paper's initialisation."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 1, dtype=dtype)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x))


class GatedLoRA(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, r: int, alpha: float, dtype: torch.dtype):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(r, linear.in_features, dtype=dtype))
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, r, dtype=dtype))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # LoRA's init: B = 0, so it starts inert
        self.gate = Gate(linear.in_features, dtype)
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * self.scale * F.linear(F.linear(x, self.A), self.B)


class GatedPrefix(torch.nn.Module):
    def __init__(self, kv_heads: int, tokens: int, head_dim: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.keys = torch.nn.Parameter(torch.randn(kv_heads, tokens, head_dim, dtype=dtype) * 0.02)
        self.values = torch.nn.Parameter(torch.randn(kv_heads, tokens, head_dim, dtype=dtype) * 0.02)
        self.gate = Gate(hidden, dtype)


class GatedAdapter(torch.nn.Module):
    def __init__(self, hidden: int, size: int, nonlinearity: str, dtype: torch.dtype):
        super().__init__()
        self.bottleneck = Bottleneck(hidden, size, nonlinearity, dtype)
        self.gate = Gate(hidden, dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (self.gate(h) * self.bottleneck(h)).to(h.dtype)


def _lora_hook(module, args, output):
    return output + getattr(module, MARK)(args[0]).to(output.dtype)


def _adapter_hook(module, args, output):
    return map_output(output, getattr(module, MARK))


def _prefix_gate_hook(module, args, kwargs):
    # The prefix gate is computed from the attention input; the attention function reads it.
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    module._tunery_prefix_gate = getattr(module, MARK).gate(hidden)


def _bool_mask(mask: torch.Tensor | None, b: int, q: int, k: int, device) -> torch.Tensor:
    """[b, 1, q, k] True where attention is allowed, from whatever the mask builder produced."""
    if mask is None:  # SDPA's builder drops the mask when plain causal attention suffices
        i = torch.arange(q, device=device)[:, None] + (k - q)  # queries are the last q positions
        return (torch.arange(k, device=device)[None] <= i).expand(b, 1, q, k)
    mask = mask[..., :k]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(b, 1, q, k)


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, MARK, None)
    if prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    b, heads, q, d = query.shape
    groups = heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    pk = prefix.keys.repeat_interleave(groups, dim=0).to(key.dtype).expand(b, -1, -1, -1)
    pv = prefix.values.repeat_interleave(groups, dim=0).to(value.dtype).expand(b, -1, -1, -1)
    p = pk.shape[2]
    mask = _bool_mask(attention_mask, b, q, key.shape[2], query.device)
    mask = torch.cat([mask.new_ones(b, 1, q, p), mask], dim=-1)
    keys = torch.cat([pk, key], dim=2)
    values = torch.cat(
        [torch.cat([torch.zeros_like(pv), value], dim=2), torch.cat([pv, torch.zeros_like(value)], dim=2)],
        dim=-1,
    )
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, dropout_p=dropout if module.training else 0.0
    )
    gate = module._tunery_prefix_gate.unsqueeze(1).to(out.dtype)  # [b, 1, q, 1]
    out = out[..., :d] + gate * out[..., d:]
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, prefix_attention)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def apply(model: torch.nn.Module, options: UniPeltOptions) -> torch.nn.Module:
    if not options.components:
        raise ConfigError("unipelt.components is empty.", param="unipelt.components")
    cfg = model.config
    hidden = cfg.hidden_size
    for p in model.parameters():
        p.requires_grad_(False)
    _, layers = decoder_layers(model)
    for layer in layers:
        attn = sublayer(layer, ATTENTION_NAMES, "attention")
        dtype = float_dtype(attn)
        if "lora" in options.components:
            for name in ("q_proj", "v_proj"):
                linear = getattr(attn, name, None)
                if not isinstance(linear, torch.nn.Linear):
                    raise ConfigError(f"unipelt: attention has no {name} linear layer.", param="unipelt")
                linear.add_module(MARK, GatedLoRA(linear, options.lora_r, options.lora_alpha, dtype))
                linear.register_forward_hook(_lora_hook)
        if "prefix" in options.components:
            head_dim = getattr(attn, "head_dim", None) or hidden // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            attn.add_module(MARK, GatedPrefix(kv_heads, options.prefix_tokens, head_dim, hidden, dtype))
            attn.register_forward_pre_hook(_prefix_gate_hook, with_kwargs=True)
        if "adapter" in options.components:
            mlp = sublayer(layer, MLP_NAMES, "MLP")
            size = max(1, hidden // options.reduction_factor)
            mlp.add_module(MARK, GatedAdapter(hidden, size, options.nonlinearity, float_dtype(mlp)))
            mlp.register_forward_hook(_adapter_hook)
    if "prefix" in options.components:
        register_attention()
        model.set_attn_implementation(ATTENTION)
    model.tunery_unipelt_options = options
    return model


def save(model: torch.nn.Module, out: Path) -> None:
    names = [n for n, _ in model.named_parameters() if MARK in n.split(".")]
    native.save_named(model, out, names, model.tunery_unipelt_options, "unipelt")


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    return native.load_native(base, path, UniPeltOptions, apply, trainable)


register(
    Method(
        name="unipelt",
        description="UniPELT: gated LoRA (q,v) + gated prefix + gated bottleneck adapter in one model.",
        options=UniPeltOptions,
        apply=apply,
        save=save,
        load=load,
        merge_note="input-dependent gates, prefixes and a nonlinear adapter cannot fold into weights",
        base_learning_rate=5e-4,
        scale="~1-3%",
        supports_packing=False,  # prefixes need their own attention over padded rows
    )
)
