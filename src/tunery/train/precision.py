"""Pick the compute precision from what the hardware can do (detected and measured, not assumed)."""

from __future__ import annotations

import torch

from tunery.models.cpu_bf16 import auto_bf16_on_cpu, cpu_has_bf16

__all__ = ["auto_bf16_on_cpu", "autocast_dtype", "cpu_has_bf16", "mixed_precision"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32. `auto` is bf16 on a CPU
    only where bf16 is native and measured faster than fp32 (`models/cpu_bf16.py`)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and auto_bf16_on_cpu():
        return torch.bfloat16
    return None


def mixed_precision(dtype: torch.dtype | None) -> str:
    """accelerate's name for an autocast dtype; fp16 makes it keep a grad scaler (loss scaling)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
