"""`tunery recommend`: method, batch size, precision and sequence length for a model, data and memory.

The estimate is arithmetic over the model's config and the data's token lengths. Its memory part is
`train/estimate.py`'s `peak_memory`, the one the dashboard uses too; its assumptions are printed with
every recommendation (measured error in docs/workflows.md), followed by this module's own:

- Time: training costs 6 x params FLOPs per token (full), 4 x (LoRA: no weight gradients), plus
  the LM head; the machine sustains `efficiency` of its measured fp32 matmul throughput.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunery.data import encode_chat, load_dataset
from tunery.data.stats import token_lengths
from tunery.data.types import IGNORE
from tunery.errors import ConfigError
from tunery.generation.generate import bf16_supported
from tunery.models.load import load_tokenizer, model_info
from tunery.train.estimate import ModelShape, doc_bullets, memory_assumptions, peak_memory
from tunery.train.estimate import model_shape as config_shape
from tunery.train.hparams import CPU_MIN_BATCH, auto_batch_size, device_batch_size, device_multiplier

GB = 1024**3
EFFICIENCY = 0.35  # sustained share of the matmul benchmark during training (packing, small layers)


def parse_memory(text: str) -> int:
    """'8GB', '8 GiB', '512MB', '8' (GB) -> bytes (binary units: what `free -g` shows)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--memory: cannot read {text!r}; write it like 8GB or 512MB", param="memory")
    unit = (m.group(2) or "G").upper().rstrip("B").rstrip("I") or "B"
    scale = {"B": 1, "K": 1024, "M": 1024**2, "G": GB, "T": 1024**4}[unit]
    return int(float(m.group(1)) * scale)


@dataclass
class ModelFacts:
    spec: str
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    max_positions: int | None
    architecture: str | None = None


def model_facts(spec: str) -> ModelFacts:
    info = model_info(spec)
    cfg = json.loads((Path(info["path"]) / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    h = int(info["hidden_size"] or 0)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg.get("intermediate_size") or 4 * h)
    layers = int(info["n_layers"] or 0)
    vocab = int(info["vocab_size"] or 0)
    n_params = info["n_params"]
    if not n_params:  # no safetensors to count: the Llama-style formula
        n_params = layers * (2 * h * h + 2 * h * (kv_heads * h // heads) + 3 * h * inter) + vocab * h * (
            1 if info["tie_word_embeddings"] else 2
        )
    return ModelFacts(
        spec,
        int(n_params),
        layers,
        h,
        inter,
        kv_heads * (h // heads),
        vocab,
        info["max_positions"],
        info["architecture"],
    )


@dataclass
class DataFacts:
    path: str
    n_examples: int
    lengths: list[int]
    supervised: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    def percentile(self, q: float) -> int:
        s = sorted(self.lengths)
        return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if s else 0


def data_facts(path: str, tokenizer: Any, kind: str = "chat") -> DataFacts:
    """Token lengths as training sees them (chat template, label mask) for chat data."""
    ds = load_dataset(path, kind=kind)
    if ds.kind == "chat":
        feats = [encode_chat(c, tokenizer, None) for c in ds.examples]
        lengths = [len(f["input_ids"]) for f in feats]
        supervised = [sum(1 for x in f["labels"] if x != IGNORE) for f in feats]
    else:
        lengths, _ = token_lengths(ds.examples, tokenizer)
        supervised = lengths
    return DataFacts(str(path), len(ds), lengths, supervised)


@dataclass
class Estimate:
    method: str
    precision: str
    max_length: int
    batch_size: int
    micro_batch_tokens: int
    peak_bytes: int
    parts: dict[str, int]
    epoch_seconds: float
    fits: bool
    device_bytes: int  # what the training device must hold: peak_bytes on a CPU, less on a GPU

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gb"] = round(self.peak_bytes / GB, 2)
        return d


def model_shape(m: ModelFacts) -> ModelShape:
    """The shape the estimate counts on, read from the model's config as the dashboard reads it (head
    width, MoE experts, stored dtype), with the facts' parameter count."""
    return replace(config_shape(m.spec), n_params=m.n_params)


def estimate(
    m: ModelFacts,
    d: DataFacts,
    *,
    method: str,
    precision: str,
    max_length: int,
    batch_size: int,
    micro_batch_tokens: int = 4096,
    lora_r: int = 8,
    gflops: float = 15.0,
    efficiency: float = EFFICIENCY,
    memory: int | None = None,
    device: str = "cpu",
) -> Estimate:
    """Peak memory (bytes, by part: `train.estimate.peak_memory`) and seconds per epoch of one
    training configuration."""
    lengths = [min(x, max_length) for x in d.lengths] or [1]
    sup = [min(s, x) for s, x in zip(d.supervised or lengths, lengths, strict=False)] or [1]
    mem = peak_memory(
        model_shape(m),
        method=method,
        options={"r": lora_r},
        batch_size=batch_size,
        micro_batch_tokens=micro_batch_tokens,
        mean_length=sum(lengths) / len(lengths),
        longest=max(lengths),
        max_length=max_length,
        supervised_share=sum(sup) / max(1, sum(lengths)),
        precision=precision,
        device=device,
    )
    peak = mem.peak_bytes
    flops_per_token = (6 if method == "full" else 4) * m.n_params
    seconds = d.total_tokens * flops_per_token / (gflops * 1e9 * efficiency) if d.lengths else 0.0
    return Estimate(
        method,
        precision,
        max_length,
        batch_size,
        micro_batch_tokens,
        int(peak),
        mem.parts,
        round(seconds, 1),
        memory is None or mem.device_bytes <= memory,  # on a GPU, what the GPU must hold
        mem.device_bytes,
    )


def matmul_gflops(size: int = 512, repeats: int = 8) -> float:
    """Measured fp32 matmul throughput of this machine (a fraction of a second)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e9


@dataclass
class Recommendation:
    model: dict[str, Any]
    data: dict[str, Any]
    memory_bytes: int
    device: str
    chosen: Estimate | None
    learning_rate_multiplier: float = 0.1  # what `auto` takes at the chosen batch size here
    considered: list[Estimate] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "memory_gb": round(self.memory_bytes / GB, 2),
            "device": self.device,
            "recommendation": (
                {**self.chosen.to_dict(), "learning_rate_multiplier": self.learning_rate_multiplier}
                if self.chosen
                else None
            ),
            "considered": [e.to_dict() for e in self.considered],
            "reasons": self.reasons,
            "assumptions": assumptions(),
        }


def assumptions() -> list[str]:
    """The memory estimate's assumptions (`train/estimate.py`), then this module's docstring bullets."""
    return memory_assumptions() + doc_bullets(__doc__ or "")


def round_length(n: int, cap: int | None) -> int:
    """Round a length up to a multiple of 64 (tidy, and a little slack for template tokens)."""
    value = max(64, int(math.ceil(n / 64) * 64))
    return min(value, cap) if cap else value


def recommend(
    model: str, data: str, memory: int, *, device: str | None = None, gflops: float | None = None
) -> Recommendation:
    m = model_facts(model)
    d = data_facts(data, load_tokenizer(model))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if (device == "cuda" or bf16_supported(device)) else "fp32"
    gflops = gflops or matmul_gflops()
    max_length = round_length(d.percentile(0.99), m.max_positions)
    batch = device_batch_size(d.n_examples, "device", device)  # what `auto` trains with here
    reasons = [
        f"max_length {max_length}: the 99th percentile example ({d.percentile(0.99)} tokens) "
        f"fits; longer ones ({sum(x > max_length for x in d.lengths)}) are truncated."
    ]
    # Full fine-tuning only pays off for small models with plenty of data; LoRA is the default.
    methods = ["full", "lora"] if m.n_params < 1e9 and d.n_examples >= 1000 else ["lora", "full"]
    if device == "cuda":
        methods.append("qlora")
    considered = []
    chosen = None
    for method in methods:
        for budget in (4096, 2048, 1024, 512):
            if budget < min(max_length, 512):
                continue
            est = estimate(
                m,
                d,
                method=method,
                precision=precision,
                max_length=max_length,
                batch_size=batch,
                micro_batch_tokens=budget,
                gflops=gflops,
                memory=memory,
                device=device,
            )
            considered.append(est)
            if est.fits and chosen is None:
                chosen = est
        if chosen is not None:
            break
    if chosen is None:
        reasons.append("Nothing fits: use a smaller model, QLoRA on a GPU, or more memory.")
    else:
        reasons += _chosen_reasons(chosen, memory, d.n_examples, precision)
    return Recommendation(
        model={**asdict(m), "n_params_m": round(m.n_params / 1e6, 2)},
        data={
            "path": d.path,
            "examples": d.n_examples,
            "tokens": d.total_tokens,
            "p50": d.percentile(0.5),
            "p99": d.percentile(0.99),
            "max": max(d.lengths, default=0),
            "measured_gflops": round(gflops, 1),
        },
        memory_bytes=memory,
        device=device,
        chosen=chosen,
        learning_rate_multiplier=device_multiplier(d.n_examples, batch, "device", device),
        considered=considered,
        reasons=reasons,
    )


def _chosen_reasons(chosen: Estimate, memory: int, n_examples: int, precision: str) -> list[str]:
    """Why the recommendation is what it is: memory, batch size, precision, one line each."""
    openai = auto_batch_size(n_examples)
    batch = chosen.batch_size
    return [
        f"{chosen.method}: fits {chosen.device_bytes / GB:.2f} GB of {memory / GB:.2f} GB "
        f"with micro_batch_tokens {chosen.micro_batch_tokens}.",
        f"batch_size {batch}: OpenAI's auto rule (0.2% of {n_examples} examples)."
        if batch == openai
        else f"batch_size {batch}: `auto` on a CPU takes at least {CPU_MIN_BATCH} (OpenAI's rule gives "
        f"{openai}; batch 1 runs at a fraction of batch 8's tokens/s here), learning rate scaled with it.",
        f"precision {precision}: "
        + (
            "bf16 autocast is native here and, on a CPU, measured faster than fp32."
            if precision == "bf16"
            else "this CPU has no native bf16, or bf16 was measured no faster than fp32 here."
        ),
    ]
