"""What a run trains and the memory it peaks at, before anything is loaded: the one estimate behind
`tunery recommend` (`workflows/recommend.py`), `tunery models info` and the dashboard's estimate
(`serve/ui_estimate.py`).

Each method answers for itself how many parameters it trains (`Method.trainable_parameters`, from the
model's shape and the method's options), so a new method, or a change to what one trains, reaches every
estimate at once. `peak_memory` adds up the rest under these assumptions (`memory_assumptions()`,
printed by `tunery recommend`; measured error in docs/workflows.md):

- Weights are loaded in fp32 for training (as `train.setup.build_model` does), except a frozen base
  stored in bf16 and trained under bf16 on a GPU, which stays in bf16 (2 bytes a weight).
- QLoRA stores only the nn.Linear layers of the decoder blocks in 4-bit NF4 (0.52 byte a weight with
  double quantization, 0.56 without): bitsandbytes skips the embedding, the LM head (tied or not), the
  norms and MoE experts (fused parameters, no nn.Linear), which peft's k-bit preparation keeps in fp32.
- Full fine-tuning (and freeze, on what it trains) keeps fp32 gradients and AdamW's two moments: 12
  bytes per trained parameter besides its weight. An adapter (LoRA: all linear layers, rank r) adds 16
  bytes per adapter parameter and none for the frozen base.
- Activations kept for backward: (8 * hidden + 4 * intermediate + 2 * kv_dim) values per token per
  layer for a Llama-style block (no gradient checkpointing), 4 bytes each in fp32, 2 under bf16.
  Attention uses SDPA per packed segment without materialising the L x L matrix.
- The LM head runs only at supervised positions: 3 copies (logits, softmax, gradient) of
  vocab x supervised tokens of one micro-batch, fp32.
- A micro-batch holds min(token budget, batch_size x mean length) tokens, at least the longest
  example; the token budget is micro_batch_tokens, or max_length when that is larger.
- Loading holds one extra copy of the weights at the peak, in the file's stored dtype (the mapped
  safetensors); saving a full or freeze run serialises one more fp32 copy. A run also allocates a
  fixed ~32 MB (plotting, encoded data, tokenizer).
- The runtime (Python, torch, transformers, peft) adds a fixed RUNTIME_BYTES (450 MB, measured).
- On a GPU, the runtime, the load/save copy and the fixed allocations stay in host memory; only the
  rest (weights, training state, activations, LM head) is compared with the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tunery.errors import ConfigError
from tunery.methods import METHODS
from tunery.models.shape import ModelShape, model_shape, shape_from_config

__all__ = [
    "MemoryEstimate",
    "ModelShape",
    "memory_assumptions",
    "model_shape",
    "peak_memory",
    "shape_from_config",
    "trainable_parameters",
]

RUNTIME_BYTES = 450 * 1024**2  # RSS of `import torch, transformers, peft, tunery.train` (measured)
# Per-run allocations independent of the model size: matplotlib (loss.png), encoded data, tokenizer.
FIXED_BYTES = 32 * 1024**2
# Parts that live in host memory even when training runs on a GPU (see the module docstring).
HOST_PARTS = ("runtime", "load_save_copy", "fixed")
# Methods that train the base's own weights: loaded in fp32 (`train.setup._base_dtype`), never quantized.
IN_PLACE = ("full", "freeze")


def trainable_parameters(
    method: str, shape: ModelShape, options: dict[str, Any] | None = None
) -> tuple[int, str]:
    """(trainable parameters, what trains) of `method` on a model of `shape`.

    `options` are the method's options as a request gives them; names the method does not have, and
    unset (None) values, are left out, so an estimate never fails on them. A method that gives no
    count, or a name that is no method, is estimated as a small adapter."""
    count = METHODS.get(method).trainable_parameters if method in METHODS else None
    if count is not None:
        return count(shape, method_options(method, options))
    return max(1, shape.n_params // 100), "about 1% of the weights (small adapter)"


def method_options(method: str, options: dict[str, Any] | None) -> BaseModel:
    """`options` as a request gives them, validated as `method`'s options. Names the method does not
    have, and unset (None) values, are left out, so an estimate never fails on them; a wrong value is
    a ConfigError naming it."""
    model = METHODS.get(method).options
    known = {k: v for k, v in (options or {}).items() if k in model.model_fields and v is not None}
    try:
        return model.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"Invalid {method} option {field}: {first['msg']}.", param="options") from None


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training configuration (bytes, by part) and what it was counted from."""

    parts: dict[str, int]
    trainable: int  # parameters the method trains
    trainable_note: str  # what trains, in words
    tokens: int  # tokens of one micro-batch
    device: str = "cpu"

    @property
    def peak_bytes(self) -> int:
        """Everything, host and device: the peak of one process on a CPU."""
        return sum(self.parts.values())

    @property
    def device_bytes(self) -> int:
        """What must fit in the training device's memory: all of it on a CPU, on a GPU all but
        HOST_PARTS (the runtime, the load copy and the fixed allocations stay in host memory)."""
        if self.device == "cpu":
            return self.peak_bytes
        return sum(v for k, v in self.parts.items() if k not in HOST_PARTS)


def peak_memory(
    shape: ModelShape,
    *,
    method: str,
    options: dict[str, Any] | None = None,
    batch_size: int,
    micro_batch_tokens: int,
    mean_length: float,
    longest: int,
    max_length: int,
    supervised_share: float = 1.0,
    precision: str = "fp32",
    device: str = "cpu",
) -> MemoryEstimate:
    """Peak memory of training a model of `shape` with `method` (and its `options`, as a request gives
    them) on examples of `mean_length` tokens (the longest `longest`, both after truncation to
    `max_length`), `supervised_share` of the tokens supervised, in `precision` ("fp32", "bf16",
    "fp16", "auto") on `device` ("cpu" or "cuda"). The module docstring lists the assumptions."""
    trainable, note = trainable_parameters(method, shape, options)
    tokens = batch_tokens(micro_batch_tokens, batch_size, mean_length, longest, max_length)
    parts = {"runtime": RUNTIME_BYTES, "weights": weight_bytes(shape, method, options, precision, device)}
    if method in IN_PLACE:
        parts["gradients"] = 4 * trainable
        parts["optimizer"] = 8 * trainable
    else:
        parts["adapter+grads+optimizer"] = 16 * trainable
    parts["load_save_copy"] = load_save_copy_bytes(shape, method)
    parts["fixed"] = FIXED_BYTES
    per_token = shape.layers * (8 * shape.hidden + 4 * shape.inter + 2 * shape.kv)
    parts["activations"] = tokens * per_token * (4 if precision == "fp32" else 2)
    parts["lm_head"] = 3 * 4 * shape.vocab * max(1, int(tokens * supervised_share))
    return MemoryEstimate(parts, trainable, note, tokens, device)


def load_save_copy_bytes(shape: ModelShape, method: str) -> int:
    """One more copy of the weights at the peak. Loading maps the safetensors file (in its stored dtype)
    while the model is built; saving a full model serialises a copy of its fp32 weights, while an
    adapter method saves only its adapter. Measured: the gap was ~4 x params for fp32 files (tests/
    test_workflows.py) and ~2 x params loading a bf16 file into LoRA at 1.2B (docs/bench/model_scale)."""
    stored = (shape.dtype or "").removeprefix("torch.")
    load = (2 if stored in ("bfloat16", "bf16", "float16", "fp16") else 4) * shape.n_params
    return max(load, 4 * shape.n_params) if method in IN_PLACE else load


def batch_tokens(budget: int, batch_size: int, mean_length: float, longest: int, max_length: int) -> int:
    """Tokens of one forward pass: `batch_size` examples of the mean length, at least the longest one,
    at most the loop's token budget (`train.setup.token_budget`: never below max_length)."""
    mean, longest = min(mean_length, max_length), min(longest, max_length)
    return max(1, int(min(max(budget, max_length), max(longest, batch_size * mean))))


def weight_bytes(
    shape: ModelShape, method: str, options: dict[str, Any] | None, precision: str, device: str
) -> int:
    """Bytes of the loaded base's weights, as `train.setup.build_model` loads them for `method`."""
    if method == "qlora":
        return qlora_weight_bytes(shape, bool(method_options(method, options).double_quant))
    stored = (shape.dtype or "").removeprefix("torch.")
    bf16_base = (
        method not in IN_PLACE
        and device == "cuda"
        and precision in ("auto", "bf16")
        and stored in ("bfloat16", "bf16")
    )
    return (2 if bf16_base else 4) * shape.n_params


def qlora_weight_bytes(shape: ModelShape, double_quant: bool = True) -> int:
    """Bytes of a QLoRA base: its 4-bit linear layers (`quantized_linears`), each with its NF4 code
    table (16 fp32 values) and, under double quantization, the 8-bit code of its constants (256 fp32);
    every other weight in fp32 (peft's k-bit preparation upcasts what transformers loaded in bf16)."""
    linears = quantized_linears(shape)
    quantized = min(shape.n_params, shape.layers * sum(a * b for a, b in linears))
    tables = shape.layers * len(linears) * 4 * (16 + 256 if double_quant else 16)
    return int(nf4_bytes(double_quant) * quantized) + tables + 4 * (shape.n_params - quantized)


def quantized_linears(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of the layers QLoRA stores in 4 bit, in one decoder layer. bitsandbytes (through
    transformers) replaces only nn.Linear layers, and leaves out the output head: the embedding and the
    LM head, tied or not, stay in full precision, as do the norms, and the MoE experts, which
    transformers fuses into plain parameters (an MoE block keeps only its attention in 4 bit)."""
    return shape.linears() if shape.experts <= 1 else shape.linears()[:4]  # q, k, v, o


def nf4_bytes(double_quant: bool = True) -> float:
    """Bytes a 4-bit NF4 weight takes: two a byte, plus one absmax per block of 64 weights, fp32, or
    8-bit with one fp32 constant per 256 blocks under double quantization."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def memory_assumptions() -> list[str]:
    """The assumptions `peak_memory` rests on: the bullet list that ends the module docstring."""
    return doc_bullets(__doc__ or "")


def doc_bullets(doc: str) -> list[str]:
    """The "- " bullets of a docstring, each joined onto one line (the last runs to the end)."""
    return [" ".join(part.split()) for part in doc.split("\n- ")[1:]]
