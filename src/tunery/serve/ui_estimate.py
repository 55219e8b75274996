"""The dashboard's estimate of a fine-tuning job (`POST /v1/tunery/estimate`), from the model's config
(no weights are loaded) and the training file's token counts. The memory is `train.estimate.peak_memory`,
the estimate `tunery recommend` makes; this module reads the request, counts the file, adds a rough
time and groups the memory as the page shows it. It is meant to tell "fits / takes minutes" from
"will not fit / takes days", not to be exact: every assumption is returned with the numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.config import Hyperparameters
from tunery.data import validate_file
from tunery.errors import TuneryError
from tunery.models.load import load_tokenizer
from tunery.models.placement import bf16_supported
from tunery.objectives import validation_kind
from tunery.train.estimate import RUNTIME_BYTES, model_shape, peak_memory
from tunery.train.hparams import auto_epochs, device_batch_size

# Rough sustained training throughput: the time estimate's only calibration constant.
GPU_FLOPS = 5.0e13
CPU_FLOPS_PER_CORE = 2.0e10
STARTUP_SECONDS = 20.0
STEP_OVERHEAD_SECONDS = 0.05
# The share of tokens assumed supervised when the file's tokens could not be counted.
SUPERVISED_SHARE = 0.5


@dataclass
class Counted:
    """What validating the training file counted; None where it could not count."""

    n: int | None = None
    mean: float | None = None
    longest: int | None = None
    supervised_share: float | None = None


def _token_counts(base_spec: str, data_path: Path | None, objective: str) -> Counted:
    if data_path is None:
        return Counted()
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
    tokens = report.stats.get("tokens") or {}
    total, trained = report.stats.get("total_tokens"), report.stats.get("trained_tokens")
    return Counted(
        n=int(report.stats.get("valid_examples") or report.n or 0),
        mean=float(tokens["mean"]) if tokens.get("mean") else None,
        longest=int(tokens["max"]) if tokens.get("max") else None,
        # preference pairs train on both answers: more than the longest row holds, so at most all
        supervised_share=min(1.0, trained / total) if total and trained else None,
    )


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


def _precision(hp: dict[str, Any], on_gpu: bool) -> str:
    """The request's precision, or what `auto` picks as `tunery recommend` does: bf16 on a GPU and on a
    CPU where bf16 is native and measured faster than fp32 (`models/cpu_bf16.py`), else fp32."""
    chosen = hp.get("precision")
    if chosen in ("bf16", "fp16", "fp32"):
        return str(chosen)
    return "bf16" if on_gpu or bf16_supported("cpu") else "fp32"


def _by_part(parts: dict[str, int]) -> dict[str, int]:
    """`peak_memory`'s parts grouped as the page shows them; the groups add up to the same total."""
    return {
        "weights": parts["weights"],
        "gradients_and_optimizer": sum(
            parts.get(k, 0) for k in ("gradients", "optimizer", "adapter+grads+optimizer")
        ),
        "activations": parts["activations"] + parts["lm_head"],
        "runtime": parts["runtime"] + parts["fixed"],
        "load_save_copy": parts["load_save_copy"],
    }


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
    hp = dict(hyperparameters or {})
    shape = model_shape(base_spec)
    counted = _token_counts(base_spec, data_path, objective)
    n = int(n_examples or counted.n or 0)
    if n <= 0:
        raise TuneryError("Give a training file or a number of examples to estimate.", param="n_examples")
    defaults = Hyperparameters()
    max_length = int(hp.get("max_length") or defaults.max_length)
    mean_tokens = min(float(tokens_per_example or counted.mean or 256), max_length)
    longest = counted.longest if tokens_per_example is None and counted.longest else mean_tokens
    epochs = hp.get("n_epochs", "auto")
    epochs = auto_epochs(n) if epochs in (None, "auto") else int(epochs)
    device, flops_per_s, device_memory = _device()
    batch = hp.get("batch_size", "auto")
    rule = hp.get("auto_rule") or defaults.auto_rule
    on = "cpu" if device_memory is None else "cuda"
    batch = device_batch_size(n, rule, on) if batch in (None, "auto") else int(batch)

    memory = peak_memory(
        shape,
        method=method,
        options=options,
        batch_size=batch,
        micro_batch_tokens=int(hp.get("micro_batch_tokens") or defaults.micro_batch_tokens),
        mean_length=mean_tokens,
        longest=int(longest),
        max_length=max_length,
        supervised_share=counted.supervised_share or SUPERVISED_SHARE,
        precision=_precision(hp, on_gpu=device_memory is not None),
        device=on,
    )
    total_memory = memory.peak_bytes
    tokens = int(n * mean_tokens * epochs)
    # forward 2*P*T, backward through activations 2*P*T, weight gradients 2*P_trainable*T
    flops = tokens * (4 * shape.n_params + 2 * memory.trainable)
    steps = epochs * -(-n // max(1, batch))
    # Fixed costs dominate small jobs: starting the worker and loading the model, then the
    # optimizer step and logging per step.
    seconds = STARTUP_SECONDS + steps * STEP_OVERHEAD_SECONDS + flops / flops_per_s
    return {
        "model": base_spec,
        "method": method,
        "parameters": int(shape.n_params),
        "trainable_parameters": int(memory.trainable),
        "trainable_note": memory.trainable_note,
        "n_examples": n,
        "tokens_per_example": round(mean_tokens, 1),
        "tokens_counted": counted.mean is not None and tokens_per_example is None,
        "n_epochs": epochs,
        "batch_size": batch,
        "total_steps": steps,
        "trained_tokens": tokens,
        "memory_bytes": {**_by_part(memory.parts), "total": total_memory},
        "device": device,
        "device_memory_bytes": device_memory,
        "device_bytes": memory.device_bytes,  # on a GPU, the parts outside HOST_PARTS
        "fits": None if device_memory is None else memory.device_bytes <= device_memory * 0.9,
        "seconds": round(seconds, 1),
        "assumptions": (
            f"{flops_per_s / 1e9:.0f} GFLOP/s sustained on {device} plus {STARTUP_SECONDS:.0f} s to start; "
            f"{memory.parts['weights'] / max(1, shape.n_params):.2g} bytes per weight; "
            f"memory as `tunery recommend` counts it: the runtime ({RUNTIME_BYTES // 1024**2} MB), one "
            "load/save copy of the weights, AdamW, activations without gradient checkpointing. "
            "A rough guide, not a promise."
        ),
    }
