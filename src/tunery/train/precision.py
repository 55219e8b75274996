"""Pick the compute precision from what the hardware can do (detected, not assumed)."""

from __future__ import annotations

import torch

from tunery.models.placement import cpu_has_bf16

__all__ = ["autocast_dtype", "cpu_has_bf16", "mixed_precision"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def mixed_precision(dtype: torch.dtype | None) -> str:
    """accelerate's name for an autocast dtype; fp16 makes it keep a grad scaler (loss scaling)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
