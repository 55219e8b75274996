"""Where a model runs and in which precision: the one place that decides it.

Inference (eval, chat, generate, the server's engine, quickstart evaluations, judges) places its
model with `place`; every tensor that meets a model is then created on `model_device(model)`, so
the same code runs on a CPU and on a GPU. `TUNERY_DEVICE` overrides the choice (`cpu`, `cuda`,
`cuda:1`). Training keeps accelerate's choice of device and uses `load_dtype` for the base.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from tunery.models.cpu_bf16 import auto_bf16_on_cpu
from tunery.models.unwrap import unwrap

DEVICE_ENV = "TUNERY_DEVICE"


def bf16_supported(device: torch.device | str | None = None) -> bool:
    """Whether to autocast to bf16 on `device` (default: the inference one): a GPU with bf16, or a CPU
    where bf16 is measured faster than fp32 (`cpu_bf16.auto_bf16_on_cpu`, the one answer for CPUs)."""
    device = torch.device(device) if device is not None else inference_device()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return auto_bf16_on_cpu()
    return False


def inference_device() -> torch.device:
    """The device inference models go to: TUNERY_DEVICE, else the first GPU when there is one."""
    wanted = os.environ.get(DEVICE_ENV)
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_device(model: Any) -> torch.device:
    """The device of a model's weights (its first parameter or buffer; the CPU for none)."""
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            return t.device
    return torch.device("cpu")


def _placed_by_loader(model: Any) -> bool:
    # bitsandbytes puts quantized weights on a GPU itself, and accelerate's device maps spread a
    # model over devices; moving either would break it.
    base = unwrap(model)
    return bool(
        getattr(base, "hf_device_map", None)
        or getattr(base, "is_loaded_in_4bit", False)
        or getattr(base, "is_loaded_in_8bit", False)
        or getattr(base, "hf_quantizer", None) is not None
    )


def place(model: Any, device: torch.device | str | None = None) -> Any:
    """Move an inference model to `device` (default `inference_device()`); returns the model.

    Models whose loader already placed them (quantized, device-mapped) stay where they are."""
    if _placed_by_loader(model):
        return model
    target = torch.device(device) if device is not None else inference_device()
    current = model_device(model)
    # "cuda" means the current GPU: a model already on cuda:0 is not moved for it.
    if current.type != target.type or (target.index is not None and current.index != target.index):
        model = model.to(target)
    return model


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """`torch.autocast` for the device that runs the block (nothing for device types without one)."""
    if not enabled or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_dtype(stored: str | None, device: torch.device, frozen_base: bool) -> torch.dtype:
    """The dtype to load a base in for training on `device`.

    A frozen base stored in bf16 stays in bf16 on a GPU with bf16 (2 bytes a parameter, and the
    fused LoRA kernel then reads it without a copy); every other case keeps fp32 weights, which an
    optimizer needs when it updates them and a CPU computes fastest."""
    stored = (stored or "").removeprefix("torch.")
    if frozen_base and stored in ("bfloat16", "bf16") and device.type == "cuda" and bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def enable_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on CUDA (Ampere and later)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch dict with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
