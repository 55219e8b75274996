"""Write a merged transformers model as a GGUF file that llama.cpp, Ollama and transformers load.

The layout follows llama.cpp's own `convert_hf_to_gguf.py`: its tensor names (`blk.N.attn_q.weight`,
taken from the `gguf` package's name map), its metadata keys, the q/k row permutation of the Llama
architecture (llama.cpp applies rotary embeddings to interleaved pairs, transformers to two halves),
and its choice of which tensors stay f32 (every 1-D tensor: norms and biases are tiny and sensitive).

Tensor types: f32, f16, bf16, and the block quantizations the `gguf` package can compute (q8_0, q4_0,
q4_1, q5_0, q5_1). K-quants (q4_k, ...) need llama.cpp's `llama-quantize`; see docs/export.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import ConfigError, ModelError

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_TYPES = FLOAT_TYPES + QUANT_TYPES

# HF model_type -> llama.cpp architecture. Both are what transformers' GGUF loader reads back.
# Mistral is written as a Llama, as llama.cpp's converter does; that is exact only without a sliding
# window shorter than the context (`gguf_refusal`).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}
# Why the families Tunery trains but does not write as GGUF are refused (tests/test_architectures.py).
_REFUSED = {
    "gemma2": "Gemma stores its norms as w - 1 and soft-caps attention and logits; the exporter does "
    "not convert them",
    "gemma3_text": "Gemma stores its norms as w - 1 and has per-layer rope bases; the exporter does not "
    "convert them",
    "phi3": "Phi-3's fused projections and sliding window are not converted by this exporter",
    "olmo2": "transformers cannot load an OLMo 2 GGUF back, so the export could not be checked",
    "mixtral": "mixture-of-experts tensors are not converted by this exporter",
    "qwen2_moe": "mixture-of-experts tensors are not converted by this exporter",
}
# Architectures whose q/k rows llama.cpp stores permuted (its "normal" rope; qwen2/3 use NeoX rope).
_PERMUTED = {"llama"}

# llama.cpp's token types (llama_token_type in llama.h).
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4

# Pre-tokenizer names llama.cpp knows, recognised from the split regex in tokenizer.json. llama.cpp's
# converter finds them by hashing the tokenization of a probe text; the regex says the same thing.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


@dataclass
class GgufSummary:
    """What was written: for the model card and the CLI."""

    path: Path
    arch: str
    out_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    pre_tokenizer: str = "default"
    size_bytes: int = 0


def check_type(out_type: str, fallback: str = "f16") -> None:
    if out_type not in GGUF_TYPES:
        raise ConfigError(
            f"Unknown GGUF type {out_type!r}.",
            hint=f"Use one of: {', '.join(GGUF_TYPES)} (for k-quants run llama.cpp's llama-quantize "
            "on an f16 export).",
            param="quant",
        )
    if fallback not in FLOAT_TYPES:
        raise ConfigError(f"--dtype for a GGUF must be one of {', '.join(FLOAT_TYPES)}.", param="dtype")


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    out_type: str = "f16",
    *,
    fallback_type: str = "f16",
    name: str = "model",
    license: str | None = None,
    source_pre: str | None = None,
) -> GgufSummary:
    """Write `model` (a plain transformers causal LM) and its tokenizer to `path`.

    `fallback_type` is the float type of matrices a block quantization cannot hold (rows that are
    not a multiple of the block size). `source_pre` is the pre-tokenizer name of the GGUF the base
    model came from, if any: it is reused as is.
    """
    import gguf

    check_type(out_type, fallback_type)
    cfg = model.config
    refusal = gguf_refusal(cfg)
    if refusal is not None:
        raise ModelError(
            refusal,
            hint="Export with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py, or "
            "serve the HF export with Tunery or vLLM.",
            param="model",
        )
    arch = ARCHITECTURES[cfg.model_type]
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        if license:
            writer.add_license(license)
        writer.add_file_type(_file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = _add_hparams(writer, cfg, arch)
        pre = _add_tokenizer(writer, tokenizer, cfg, generation_eos(model), source_pre)
        counts = _add_tensors(writer, model, arch, out_type, fallback_type, extra)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return GgufSummary(path, arch, out_type, dict(counts), pre, path.stat().st_size)


def gguf_refusal(cfg: Any) -> str | None:
    """Why this config cannot be written as a GGUF that computes what it computes; None if it can."""
    model_type = cfg.model_type
    if model_type not in ARCHITECTURES:
        why = _REFUSED.get(model_type, "the exporter has no tensor layout for it")
        return (
            f"GGUF export supports the {', '.join(sorted(ARCHITECTURES))} architectures, not "
            f"{model_type!r}: {why}."
        )
    # A window applies when the config has one and (where layers are typed) some layer slides.
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if (
        window
        and window < cfg.max_position_embeddings
        and (layer_types is None or "sliding_attention" in layer_types)
    ):
        return (
            f"GGUF export of {model_type!r} with a sliding window of {window} tokens is not supported: "
            f"llama.cpp's {ARCHITECTURES[model_type]!r} architecture attends over the whole context, "
            "so the GGUF would compute something else beyond the window."
        )
    return None


def generation_eos(model: Any) -> list[int]:
    """The ids that end a generation, from the generation config (an int or a list there)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _file_type(out_type: str) -> int:
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
        "q4_1": F.MOSTLY_Q4_1,
        "q5_0": F.MOSTLY_Q5_0,
        "q5_1": F.MOSTLY_Q5_1,
    }[out_type]


def _add_hparams(writer: Any, cfg: Any, arch: str) -> dict[str, Any]:
    """Architecture metadata; returns extra tensors to write (llama3 rope factors)."""
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    # llama.cpp assumes hidden/heads unless told; transformers reads Qwen3's head_dim only from here
    if head_dim != cfg.hidden_size // n_head or arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope_parameters(cfg)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return {}
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return {}
    if kind == "llama3" and arch == "llama":
        return {"rope_freqs.weight": llama3_rope_factors(rope, head_dim)}
    raise ModelError(
        f"GGUF export does not handle rope scaling of type {kind!r} yet.",
        hint="Export with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py.",
        param="model",
    )


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    # transformers 5 keeps rope_theta and scaling together in rope_parameters; older configs split them.
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def llama3_rope_factors(rope: dict[str, Any], head_dim: int):
    """Per-frequency divisors llama.cpp reads from `rope_freqs.weight` for Llama 3.1+ rope scaling."""
    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --------------------------------------------------------------------------- tokenizer


def tokenizer_pre(backend: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json (`default` when unrecognised)."""
    pre = backend.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and items[0].get("individual_digits")
        and items[1].get("use_regex", True)
    ):
        return "smollm"  # SmolLM: GPT-2's split, with every digit on its own
    for p in items:
        if p.get("type") == "Split":
            name = _SPLIT_NAMES.get((p.get("pattern") or {}).get("Regex", ""))
            if name:
                return name
    return "default"


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The BPE vocabulary as llama.cpp stores it: tokens by id, their types, merges, special ids."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    decoder = (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ModelError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in SmolLM, Llama 3 and "
            f"Qwen2); this tokenizer is {model.get('type')} with a {decoder} decoder.",
            hint="Export with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py.",
            param="model",
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in backend.get("added_tokens", [])}
    if by_id and max(by_id) >= vocab_size:
        raise ModelError(
            f"The tokenizer has {max(by_id) + 1} tokens but the model's embedding only {vocab_size}.",
            hint="Resize the token embeddings before training, so every token has a row.",
            param="model",
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows beyond the tokenizer (padding to a multiple of 64 etc.)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": tokenizer_pre(backend),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        # llama.cpp adds BOS/EOS by these flags; read them off the tokenizer's actual behaviour.
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }


def _add_tokenizer(writer: Any, tokenizer: Any, cfg: Any, gen_eos: list[int], source_pre: str | None) -> str:
    f = tokenizer_fields(tokenizer, cfg.vocab_size)
    pre = source_pre or f["pre"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(f["tokens"])
    writer.add_token_types(f["types"])
    writer.add_token_merges(f["merges"])
    for key, adder in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if f[key] is not None:
            adder(f[key])
    writer.add_add_bos_token(bool(f["add_bos"]))
    writer.add_add_eos_token(bool(f["add_eos"]))
    # A generation config may end turns with a second token (Llama 3: <|eot_id|>): llama.cpp calls it EOT.
    for extra in gen_eos:
        if extra != f["eos"]:
            writer.add_eot_token_id(extra)
            break
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return pre


# --------------------------------------------------------------------------- tensors


def gguf_name(hf_name: str, arch: str, n_blocks: int) -> str:
    name = _name_map(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ModelError(
            f"The model has a tensor GGUF has no name for: {hf_name}.",
            hint="This architecture variant is not supported by the GGUF exporter; export --format hf.",
            param="model",
        )
    return name


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int) -> Any:
    """gguf's HF-to-GGUF tensor name map of an architecture. Building one takes 43 ms (every name
    pattern of every block): built per tensor it was 12 s of a 135M model's 22 s export."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    return gguf.get_tensor_name_map(arch_enum, n_blocks)


def permute_rotary(weights: Any, n_head: int) -> Any:
    """llama.cpp's reordering of q/k rows (`LlamaModel.permute`): per head, the two rotary halves
    become interleaved pairs. transformers' GGUF loader applies the inverse."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tensors(
    writer: Any, model: Any, arch: str, out_type: str, fallback: str, extra: dict[str, Any]
) -> Counter:
    import numpy as np
    import torch

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: Counter = Counter()
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        if tied and hf_name == "lm_head.weight":
            continue  # the loader ties output to token_embd when output.weight is absent
        name = gguf_name(hf_name, arch, cfg.num_hidden_layers)
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch in _PERMUTED and ".attn_q." in name:
            data = permute_rotary(data, n_head)
        elif arch in _PERMUTED and ".attn_k." in name:
            data = permute_rotary(data, n_kv)
        qtype = _add_one(writer, name, data, out_type, fallback)
        counts[qtype] += 1
    for name, data in extra.items():
        counts[_add_one(writer, name, np.asarray(data, dtype=np.float32), "f32", fallback)] += 1
    return counts


def tensor_type(name: str, shape: tuple[int, ...], out_type: str, fallback: str) -> str:
    """The type one tensor is stored as, following llama.cpp's converter and quantizer."""
    import gguf

    if len(shape) <= 1:
        return "f32"  # norms and biases: tiny, and precision-sensitive
    if out_type in FLOAT_TYPES:
        return out_type
    block, _ = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, out_type.upper())]
    if shape[-1] % block:
        return fallback  # a row must be whole blocks
    # 4/5-bit types keep the embedding and output matrices at 8 bits: they are the most sensitive
    # tensors, and llama.cpp's quantizer also stores the output at a higher precision.
    if out_type != "q8_0" and name in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return out_type


def _add_one(writer: Any, name: str, data: Any, out_type: str, fallback: str) -> str:
    import gguf
    import numpy as np

    qtype = tensor_type(name, tuple(data.shape), out_type, fallback)
    if qtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    else:
        ggml_type = getattr(gguf.GGMLQuantizationType, qtype.upper())
        packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), ggml_type)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=ggml_type)
    return qtype
