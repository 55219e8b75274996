"""A rough memory and time estimate of a fine-tuning job, from the model's config (no weights are
loaded) and the training file's token counts. It is meant to tell "fits / takes minutes" from
"will not fit / takes days", not to be exact: every assumption is returned with the numbers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.models.shape import ModelShape

# Rough sustained training throughput: the time estimate's only calibration constant.
GPU_FLOPS = 5.0e13
CPU_FLOPS_PER_CORE = 2.0e10
STARTUP_SECONDS = 20.0
STEP_OVERHEAD_SECONDS = 0.05


def _token_counts(base_spec: str, data_path: Path | None, objective: str) -> tuple[int | None, float | None]:
    if data_path is None:
        return None, None
    from tunery.config import Hyperparameters
    from tunery.data import validate_file
    from tunery.models.load import load_tokenizer
    from tunery.objectives import validation_kind

    try:
        tokenizer = load_tokenizer(base_spec)
    except Exception:  # a tokenizer that cannot load still leaves the example count useful
        tokenizer = None
    report = validate_file(
        data_path,
        method=objective,
        tokenizer=tokenizer,
        max_length=Hyperparameters.model_fields["max_length"].default,
        kind=validation_kind(objective),
        min_examples=0,
    )
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


def _memory(
    method: str, shape: ModelShape, trainable: int, micro_tokens: int, on_gpu: bool
) -> tuple[dict[str, int], float]:
    """(bytes by part, bytes per weight) of training `trainable` of the model's parameters."""
    weight_bytes: float = 2 if on_gpu else 4  # bf16 on a GPU, fp32 on CPU
    if method == "qlora":
        weight_bytes = 0.55  # 4-bit NF4 plus its quantization constants
    act_bytes = 2 if on_gpu else 4
    memory = {
        "weights": int(shape.n_params * weight_bytes),
        # fp32 gradient + AdamW's two moments for each trainable parameter
        "gradients_and_optimizer": int(trainable * 12),
        # per token and layer, about 18 hidden-size activations kept for backward; the LM head
        # runs only at supervised positions (about half the tokens)
        "activations": int(micro_tokens * shape.hidden * shape.layers * 18 * act_bytes)
        + int(micro_tokens / 2 * shape.vocab * 4 * 2),
    }
    if method in ("full", "freeze") and weight_bytes < 4:
        memory["gradients_and_optimizer"] += int(trainable * 4)  # fp32 master weights
    return memory, weight_bytes


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
    from tunery.train.estimate import model_shape, trainable_parameters
    from tunery.train.hparams import auto_batch_size, auto_epochs

    hp = dict(hyperparameters or {})
    shape = model_shape(base_spec)
    total = shape.n_params
    trainable, what = trainable_parameters(method, shape, options)

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
    memory, weight_bytes = _memory(method, shape, trainable, micro_tokens, on_gpu=device_memory is not None)
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
