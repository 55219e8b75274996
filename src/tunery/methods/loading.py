"""Load a base model with a trained method on top, from a run's saved model directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunery.errors import ModelError
from tunery.methods.registry import METHODS
from tunery.models import load_model, load_tokenizer
from tunery.models.load import ensure_pad_token
from tunery.models.placement import place


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


def saved_tokenizer(info: dict[str, Any] | None, spec: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer a model was trained with: the saved dir's own (its chat template) when the run
    saved one there, else the base spec's. The saved dir is not a model spec, so it is read as it is,
    not resolved."""
    if info and (Path(info["path"]) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust_remote_code)
        ensure_pad_token(tokenizer, info["path"])
        return tokenizer
    return load_tokenizer(spec, trust_remote_code=trust_remote_code)


def load_saved_method(
    info: dict[str, Any], build_base: Callable[..., torch.nn.Module], trainable: bool = False
) -> torch.nn.Module:
    """The saved method of `info` (`read_info`) restored onto the base `build_base(**load_kwargs)`
    returns. The caller builds the base for its task (causal LM, reward or class head, f32 for
    export); the method adds what it needs to load as it trained (qlora: the 4-bit config)."""
    method = METHODS.get(info["method"])
    opts = method.options.model_validate(info.get("method_options") or {})
    kwargs = dict(method.load_kwargs(opts)) if method.load_kwargs else {}
    return method.load(build_base(**kwargs), Path(info["path"]), trainable=trainable)


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
    info = read_info(adapter) if adapter else None
    spec = model or (info or {}).get("base_model")
    if not spec:
        raise ModelError("No base model given and the adapter does not name one.", hint="Pass --model.")
    tokenizer = saved_tokenizer(info, spec, trust_remote_code)

    def build_base(**kwargs: Any) -> torch.nn.Module:
        return load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)

    if info is None:
        base = build_base()
        return (base if for_training else place(base)), tokenizer
    loaded = load_saved_method(info, build_base, trainable=for_training)
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
