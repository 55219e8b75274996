"""A model's shape from its `config.json`, no weights loaded: what estimates of a run's cost read,
and what each tuning method counts its trainable parameters on (`Method.trainable_parameters`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunery.models.load import model_info


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    vocab: int
    q: int  # width of the query projection (heads x head_dim)
    kv: int  # width of each key/value projection (kv heads x head_dim)
    inter: int  # MLP width
    experts: int = 1  # MLP experts per layer (MoE), 1 for a dense model
    n_params: int = 0
    dtype: str | None = None  # the stored weights' dtype (config.json), e.g. "bfloat16"

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer: q, k, v, o, then gate, up, down of
        each expert (a Llama-style gated MLP)."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.inter
        return [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i), (h, i), (i, h)] * self.experts

    def layer_parameters(self) -> int:
        return sum(a * b for a, b in self.linears())

    def low_rank_parameters(self, r: int) -> int:
        """Rank-`r` A and B matrices on every linear layer of the decoder (LoRA on `all-linear`)."""
        return self.layers * r * sum(a + b for a, b in self.linears())


def shape_from_config(config: dict[str, Any], n_params: int | None = None, tied: bool = False) -> ModelShape:
    """The shape a (text) config describes; without a parameter count the Llama-style formula."""
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    shape = ModelShape(
        hidden=hidden,
        layers=int(text.get("num_hidden_layers") or text.get("n_layer") or 0),
        vocab=int(text.get("vocab_size") or 0),
        q=heads * head_dim,
        kv=int(text.get("num_key_value_heads") or heads) * head_dim,
        inter=int(text.get("intermediate_size") or 4 * hidden),
        experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
        dtype=config.get("dtype") or config.get("torch_dtype"),  # as `models.load.model_info` reads it
    )
    if not n_params:
        n_params = shape.layers * shape.layer_parameters() + shape.vocab * shape.hidden * (1 if tied else 2)
    return replace(shape, n_params=int(n_params))


def model_shape(spec: str) -> ModelShape:
    """The shape of a model spec (alias, directory, hub id), counted from its safetensors headers
    when it has them."""
    info = model_info(spec)
    config = json.loads((Path(info["path"]) / "config.json").read_text())
    return shape_from_config(config, info.get("n_params"), info.get("tie_word_embeddings", False))
