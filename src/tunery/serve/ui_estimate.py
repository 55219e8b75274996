"""A rough memory and time estimate of a fine-tuning job, from the model's config (no weights are
loaded) and the training file's token counts. It is meant to tell "fits / takes minutes" from
"will not fit / takes days", not to be exact: every assumption is returned with the numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

# Methods that train low-rank adapters on every linear layer (parameter count ~ r * (in + out)).
# Rough sustained training throughput: the time estimate's only calibration constant.
GPU_FLOPS = 5.0e13
CPU_FLOPS_PER_CORE = 2.0e10
STARTUP_SECONDS = 20.0
STEP_OVERHEAD_SECONDS = 0.05
_LORA_LIKE = ("lora", "dora", "qlora", "rslora", "pissa", "olora", "loraplus", "lora_plus", "vera")


def _shape(config: dict[str, Any]) -> dict[str, int]:
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    inter = int(text.get("intermediate_size") or 4 * hidden)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    return {
        "hidden": hidden,
        "layers": int(text.get("num_hidden_layers") or text.get("n_layer") or 0),
        "vocab": int(text.get("vocab_size") or 0),
        "q": heads * head_dim,
        "kv": kv,
        "inter": inter,
        "experts": experts,
    }


def _params_from_shape(s: dict[str, int], tied: bool) -> int:
    attn = s["hidden"] * (2 * s["q"] + 2 * s["kv"])
    mlp = 3 * s["hidden"] * s["inter"] * s["experts"]
    emb = s["vocab"] * s["hidden"] * (1 if tied else 2)
    return s["layers"] * (attn + mlp) + emb


def _trainable(method: str, s: dict[str, int], total: int, options: dict[str, Any]) -> tuple[int, str]:
    if method in ("full", "freeze"):
        return total, "all parameters train" if method == "full" else "upper layers train (counted as all)"
    if method in _LORA_LIKE or "lora" in method:
        r = int(options.get("r") or 16)
        h, q, kv, i = s["hidden"], s["q"], s["kv"], s["inter"]
        per_layer = r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 2 * s["experts"] + (i + h) * s["experts"])
        return s["layers"] * per_layer, f"rank-{r} adapters on every linear layer"
    # Other adapters (prompt tuning, IA3, BitFit...) train well under 1% of the weights.
    return max(1, total // 100), "about 1% of the weights (small adapter)"


def _token_counts(base_spec: str, data_path: Path | None, objective: str) -> tuple[int | None, float | None]:
    if data_path is None:
        return None, None
    from tunery.data import validate_file
    from tunery.models.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(base_spec)
    except Exception:  # a tokenizer that cannot load still leaves the example count useful
        tokenizer = None
    report = validate_file(data_path, method=objective, tokenizer=tokenizer, min_examples=0)
    n = int(report.stats.get("valid_examples") or report.n or 0)
    mean = (report.stats.get("tokens") or {}).get("mean")
    return n, float(mean) if mean else None


def _device() -> tuple[str, float, int | None]:
    """(device name, assumed training FLOP/s, accelerator memory in bytes or None)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, GPU_FLOPS, int(props.total_memory)
    except Exception:
        pass
    return f"CPU ({os.cpu_count()} cores)", CPU_FLOPS_PER_CORE * (os.cpu_count() or 1), None


def estimate_job(
    base_spec: str,
    *,
    method: str = "lora",
    objective: str = "sft",
    data_path: Path | None = None,
    n_examples: int | None = None,
    tokens_per_example: float | None = None,
    hyperparameters: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Memory (bytes, by part) and wall time (seconds) of training `base_spec` with `method`."""
    from tunery.config import Hyperparameters
    from tunery.models.load import model_info
    from tunery.train.hparams import auto_batch_size, auto_epochs

    hp = dict(hyperparameters or {})
    info = model_info(base_spec)
    config = json.loads((Path(info["path"]) / "config.json").read_text())
    shape = _shape(config)
    total = info.get("n_params") or _params_from_shape(shape, info.get("tie_word_embeddings", False))
    trainable, what = _trainable(method, shape, total, options or {})

    counted_n, counted_mean = _token_counts(base_spec, data_path, objective)
    n = int(n_examples or counted_n or 0)
    if n <= 0:
        raise TuneryError("Give a training file or a number of examples to estimate.", param="n_examples")
    mean_tokens = float(tokens_per_example or counted_mean or 256)
    defaults = Hyperparameters()
    max_length = int(hp.get("max_length") or defaults.max_length)
    mean_tokens = min(mean_tokens, max_length)
    epochs = hp.get("n_epochs", "auto")
    epochs = auto_epochs(n) if epochs in (None, "auto") else int(epochs)
    batch = hp.get("batch_size", "auto")
    batch = auto_batch_size(n) if batch in (None, "auto") else int(batch)
    micro_tokens = int(hp.get("micro_batch_tokens") or defaults.micro_batch_tokens)
    micro_tokens = max(min(micro_tokens, int(batch * mean_tokens)), int(mean_tokens))

    device, flops_per_s, device_memory = _device()
    weight_bytes = 2 if device_memory else 4  # bf16 on a GPU, fp32 on CPU
    if method == "qlora":
        weight_bytes = 0.55  # 4-bit NF4 plus its quantization constants
    act_bytes = 2 if device_memory else 4
    memory = {
        "weights": int(total * weight_bytes),
        # fp32 gradient + AdamW's two moments for each trainable parameter
        "gradients_and_optimizer": int(trainable * 12),
        # per token and layer, about 18 hidden-size activations kept for backward; the LM head
        # runs only at supervised positions (about half the tokens)
        "activations": int(micro_tokens * shape["hidden"] * shape["layers"] * 18 * act_bytes)
        + int(micro_tokens / 2 * shape["vocab"] * 4 * 2),
    }
    if method in ("full", "freeze") and weight_bytes < 4:
        memory["gradients_and_optimizer"] += int(trainable * 4)  # fp32 master weights
    total_memory = sum(memory.values())
    tokens = int(n * mean_tokens * epochs)
    # forward 2*P*T, backward through activations 2*P*T, weight gradients 2*P_trainable*T
    flops = tokens * (4 * total + 2 * trainable)
    steps = epochs * -(-n // max(1, batch))
    # Fixed costs dominate small jobs: starting the worker and loading the model, then the
    # optimizer step and logging per step.
    seconds = STARTUP_SECONDS + steps * STEP_OVERHEAD_SECONDS + flops / flops_per_s
    return {
        "model": base_spec,
        "method": method,
        "parameters": int(total),
        "trainable_parameters": int(trainable),
        "trainable_note": what,
        "n_examples": n,
        "tokens_per_example": round(mean_tokens, 1),
        "tokens_counted": counted_mean is not None and tokens_per_example is None,
        "n_epochs": epochs,
        "batch_size": batch,
        "total_steps": steps,
        "trained_tokens": tokens,
        "memory_bytes": {**memory, "total": total_memory},
        "device": device,
        "device_memory_bytes": device_memory,
        "fits": None if device_memory is None else total_memory <= device_memory * 0.9,
        "seconds": round(seconds, 1),
        "assumptions": (
            f"{flops_per_s / 1e9:.0f} GFLOP/s sustained on {device} plus {STARTUP_SECONDS:.0f} s to start; "
            f"{weight_bytes} bytes per weight; "
            "AdamW; activations without gradient checkpointing. A rough guide, not a promise."
        ),
    }
