"""Helpers shared by the methods that run through peft (lora, qlora, adalora, ia3, prompt learning).

All of them save PEFT's standard adapter format (`adapter_config.json` + safetensors), so any
PEFT-aware tool can read a Tunery adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunery.models.load_lock import LOAD_LOCK
from tunery.quiet import quiet_loading


def apply_config(model: torch.nn.Module, config) -> torch.nn.Module:
    from peft import get_peft_model

    with quiet_loading():  # peft reads a deprecated transformers property (tunery/quiet.py)
        return get_peft_model(model, config)


def save(model: torch.nn.Module, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    with LOAD_LOCK, quiet_loading():
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    if not trainable:  # peft leaves prompt-learning embeddings trainable even in inference mode
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload()


def base_dir(model: torch.nn.Module) -> str | None:
    """The directory the base was loaded from (prompt init text needs its tokenizer)."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
