"""Load a base model with a trained method on top, from a run's saved model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunery.errors import ModelError


def read_info(adapter: str | Path) -> dict[str, Any]:
    """tunery.json of a saved model dir; a plain PEFT adapter dir is read as LoRA."""
    path = Path(adapter)
    if (path / "model" / "tunery.json").exists():  # a run dir or checkpoint dir
        path = path / "model"
    info_file = path / "tunery.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
    elif (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        info = {"base_model": cfg.get("base_model_name_or_path"), "method": "lora", "objective": "sft"}
    else:
        raise ModelError(
            f"{adapter} is not a Tunery model or PEFT adapter directory",
            hint="Pass a run's model/ directory, a checkpoint directory, or a PEFT adapter.",
        )
    info["path"] = str(path)
    return info


def load_trained(
    model: str | None,
    adapter: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    for_training: bool = False,
):
    """(model, tokenizer): the base `model` spec, with the saved `adapter` dir applied when given.

    Models loaded for inference are placed where inference runs (`models.placement.place`)."""
    from tunery.methods import METHODS
    from tunery.models import load_model, load_tokenizer
    from tunery.models.placement import place

    info = read_info(adapter) if adapter else None
    spec = model or (info or {}).get("base_model")
    if not spec:
        raise ModelError("No base model given and the adapter does not name one.", hint="Pass --model.")
    if info and (Path(info["path"]) / "tokenizer_config.json").exists():
        # The saved dir's tokenizer (chat template) wins; it is not a model dir, so skip resolve().
        from transformers import AutoTokenizer

        from tunery.models.load import ensure_pad_token

        tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust_remote_code)
        ensure_pad_token(tokenizer, info["path"])
    else:
        tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if info is None:
        base = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        return (base if for_training else place(base)), tokenizer
    method = METHODS.get(info["method"])
    opts = method.options.model_validate(info.get("method_options") or {})
    kwargs = method.load_kwargs(opts) if method.load_kwargs else {}
    base = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    loaded = method.load(base, Path(info["path"]), trainable=for_training)
    if not for_training:
        loaded = place(loaded.eval())
    return loaded, tokenizer


def continue_training(base: torch.nn.Module, adapter: str, method) -> torch.nn.Module:
    """Sequential fine-tuning: load the saved method onto `base` with its parameters trainable."""
    info = read_info(adapter)
    if info["method"] != method.name:
        raise ModelError(
            f"{adapter} was trained with method {info['method']!r}, not {method.name!r}",
            hint=f"Set method: {info['method']} to continue training it.",
        )
    return method.load(base, Path(info["path"]), trainable=True)
