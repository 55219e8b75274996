"""Load a model (and optionally a trained adapter or model dir) for inference.

Everything goes through `tunery.methods.load_trained` (the lead's loader, which resolves aliases such as
`smollm2-135m` and reads `tunery.json`). Until that function exists, local Hugging Face directories are
loaded directly so evaluation works on the tiny test models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.errors import ModelError
from tunery.models.load_lock import LOAD_LOCK


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
    try:
        from tunery.methods import load_trained
        from tunery.models import load_model  # noqa: F401 - load_trained needs it
    except ImportError:  # the model-loading package is still being written: load local dirs directly
        load_trained = None
    if load_trained is not None:
        mdl, tok = load_trained(model, adapter, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        mdl, tok = _load_local(model, adapter, dtype=dtype, trust_remote_code=trust_remote_code)
    mdl.eval()
    return mdl, tok


def _load_local(
    model: str | None, adapter: str | None, *, dtype: Any, trust_remote_code: bool
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = model or (adapter_base(adapter) if adapter else None)
    if spec is None:
        raise ModelError("No model given, and the adapter does not name its base model.", param="model")
    if not Path(spec).is_dir():
        raise ModelError(
            f"Model not found: {spec!r} (expected a local Hugging Face model directory).", param="model"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    with LOAD_LOCK:
        base = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
        if adapter is None:
            return base, tok
        adapter = str(model_dir(adapter))
        if is_peft_adapter(adapter):
            from peft import PeftModel

            return PeftModel.from_pretrained(base, adapter, is_trainable=False), tok
        return AutoModelForCausalLM.from_pretrained(adapter, **kwargs), tok
