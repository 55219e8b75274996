"""Load a model (and optionally a trained adapter or model dir) for inference.

Everything goes through `tunery.methods.load_trained`, which resolves aliases such as `smollm2-135m`
and reads `tunery.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.errors import ModelError
from tunery.methods import load_trained


def model_dir(adapter: str | Path) -> Path:
    """The saved model directory itself: a run or checkpoint dir points at its `model/` subdir."""
    path = Path(adapter)
    if not (path / "tunery.json").exists() and (path / "model" / "tunery.json").exists():
        return path / "model"
    return path


def adapter_base(adapter: str | Path) -> str | None:
    """The base model spec an adapter was trained on (tunery.json, else PEFT's adapter_config.json)."""
    root = model_dir(adapter)
    for name, key in (("tunery.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        f = root / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get(key)
            except (OSError, json.JSONDecodeError):
                continue
            if value:
                return str(value)
    return None


def is_peft_adapter(path: str | Path) -> bool:
    """True for a directory that holds a PEFT adapter, which can share a loaded base with others."""
    return (model_dir(path) / "adapter_config.json").is_file()


def load_for_inference(
    model: str | None, adapter: str | None = None, *, dtype: Any = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a base spec plus an optional saved model/adapter dir."""
    if adapter is not None and not Path(adapter).is_dir():
        raise ModelError(f"Adapter directory not found: {adapter}", param="adapter")
    mdl, tok = load_trained(model, adapter, dtype=dtype, trust_remote_code=trust_remote_code)
    mdl.eval()
    return mdl, tok
