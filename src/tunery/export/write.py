"""`export(model, adapter, fmt, out, ...)`: write a trained model in a format other servers load.

- `hf`: the method merged into the base weights, saved as (sharded) safetensors with the tokenizer,
  chat template and generation config. Plain transformers loads it; Tunery is not needed.
- `gguf`: the same merged model as one GGUF file (see `gguf_file.py`) plus an Ollama `Modelfile`.
- `adapter`: the PEFT adapter as is (LoRA for vLLM, TGI, PEFT), with its tokenizer.

Every export carries a model card (`card.py`). The output is built in a temporary directory beside
`out` and renamed into place at the end, so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import ConfigError, ModelError, TuneryError
from tunery.export import card as cards
from tunery.export.gguf_file import FLOAT_TYPES, GGUF_TYPES, check_type, write_gguf
from tunery.export.ollama import modelfile
from tunery.export.vllm import vllm_issues
from tunery.methods import METHODS, read_info
from tunery.methods.loading import load_saved_method, saved_tokenizer
from tunery.models import ALIASES, load_model, resolve
from tunery.models.gguf import read_gguf, source_info
from tunery.quiet import quiet_loading

FORMATS = ("hf", "gguf", "adapter")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# PEFT methods that change the input (virtual tokens, prefixes) rather than weights: nothing to merge.
PROMPT_LEARNING = {
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass
class Source:
    """What is being exported: a base spec and, optionally, a saved model dir on top of it."""

    base: str
    model_dir: Path | None
    info: dict[str, Any] | None

    @property
    def method(self) -> str | None:
        return (self.info or {}).get("method")

    def adapter_config(self) -> dict[str, Any] | None:
        f = self.model_dir / "adapter_config.json" if self.model_dir else None
        return json.loads(f.read_text()) if f and f.is_file() else None


def export(
    model: str | None,
    adapter: str | Path | None = None,
    fmt: str = "hf",
    out: str | Path = "export",
    dtype: str | None = None,
    quant: str | None = None,
    *,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Export `model` (+ `adapter`, a saved model dir) as `fmt` into the directory `out`; returns it.

    dtype: f32 | f16 | bf16. For hf it is the saved weight type (default: the base's); for gguf it
    is the tensor type without --quant (default f16), and the fallback type with it.
    quant: a GGUF type (q8_0, q4_0, ...), gguf only.
    """
    _check_options(fmt, dtype, quant)
    source = _source(model, adapter)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(
            f"The output directory {out} already exists and is not empty.",
            hint="Choose another --out, or pass --force to replace it.",
            param="out",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if fmt == "adapter":
            details = _write_adapter(source, staging, model, dtype, out.name)
        else:
            check_mergeable(source, fmt)
            merged, tokenizer = load_merged(source, trust_remote_code)
            if fmt == "hf":
                base_dtype = stored_dtype(source.base)
                details = _write_hf(merged, tokenizer, staging, dtype, max_shard_size, base_dtype, out.name)
            else:
                details = _write_gguf(merged, tokenizer, staging, source, quant or dtype or "f16", dtype)
        license = base_license(source.base)
        prov = cards.collect(source.base, source.model_dir, source.info, license)
        what = source.base + (f" + {source.method}" if source.method else "")
        title = f"{out.name} ({fmt} export of {what})"
        (staging / "README.md").write_text(cards.render(prov, fmt, details, title), encoding="utf-8")
        _share(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_options(fmt: str, dtype: str | None, quant: str | None) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.", param="format")
    if dtype is not None and dtype not in HF_DTYPES:
        raise ConfigError(f"Unknown dtype {dtype!r}; use one of {', '.join(HF_DTYPES)}.", param="dtype")
    if quant is not None and fmt != "gguf":
        raise ConfigError(
            f"--quant applies to --format gguf only, not {fmt}.",
            hint="For a smaller safetensors model use --dtype bf16 or f16.",
            param="quant",
        )
    if fmt == "gguf":
        check_type(quant or dtype or "f16", dtype or "f16")


def _source(model: str | None, adapter: str | Path | None) -> Source:
    if adapter is None:
        if not model:
            raise ConfigError("Pass --model, --adapter, or both.", param="model")
        return Source(model, None, None)
    if not Path(adapter).is_dir():
        raise ModelError(f"Adapter directory not found: {adapter}", param="adapter")
    info = read_info(adapter)
    base = model or info.get("base_model")
    if not base:
        raise ModelError(
            f"{adapter} does not name its base model.", hint="Pass the base with --model.", param="model"
        )
    return Source(str(base), Path(info["path"]), info)


def check_mergeable(source: Source, fmt: str) -> None:
    """Refuse, with the options, a method whose result cannot be folded into plain weights."""
    if source.model_dir is None:
        return
    peft_type = (source.adapter_config() or {}).get("peft_type")
    reason = None
    if peft_type in PROMPT_LEARNING:
        reason = (
            f"it is a {peft_type.lower().replace('_', ' ')} adapter: it adds learned virtual tokens to "
            "the input instead of changing weights, so there is nothing to merge into the base"
        )
    elif source.method in METHODS and not METHODS.get(source.method).can_merge:
        m = METHODS.get(source.method)
        reason = m.merge_note or f"method {m.name!r} changes the model's forward, not its weights"
    elif source.method not in METHODS:
        reason = f"its method {source.method!r} is not one this Tunery installation knows"
    if reason:
        raise TuneryError(
            f"Cannot export {source.model_dir} as {fmt}: {reason}.",
            hint=f"Options: (1) export the adapter itself: tunery export --adapter {source.model_dir} "
            "--format adapter (PEFT format, for runtimes that support this method); (2) serve it with "
            f"Tunery, which applies it at inference: tunery chat --adapter {source.model_dir}, or "
            "tunery serve; (3) retrain with a method that merges (lora or full).",
            code="not_mergeable",
            param="format",
        )


def load_merged(source: Source, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(plain transformers model in f32 with the method folded in, tokenizer)."""
    import torch

    tokenizer = saved_tokenizer(source.info, source.base, trust_remote_code)

    def build_base(**kwargs: Any) -> Any:
        # The f32 load keeps the merge itself lossless.
        return load_model(source.base, dtype=torch.float32, trust_remote_code=trust_remote_code, **kwargs)

    if source.model_dir is None:
        return build_base(), tokenizer
    method = METHODS.get(source.method)
    # The base loads as the method trained on it (qlora: 4-bit), so the merged model equals what
    # `tunery chat --adapter` serves; each method's merge returns full-precision plain weights
    # (qlora dequantizes first).
    merged = method.merge(load_saved_method(source.info, build_base))
    if hasattr(merged, "peft_config") and hasattr(merged, "base_model"):
        raise RuntimeError(f"method {method.name!r} merge returned a PEFT wrapper, not a plain model")
    merged.eval()
    return merged, tokenizer


def _fix_tokenizer_limits(model: Any, tokenizer: Any) -> None:
    # A tokenizer built from a GGUF reports a context of ~1e30 tokens: give the model's real one.
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and (tokenizer.model_max_length or 0) > limit:
        tokenizer.model_max_length = limit


def _write_hf(
    model: Any,
    tokenizer: Any,
    out: Path,
    dtype: str | None,
    max_shard_size: str | int,
    base_dtype: str | None,
    label: str,
) -> list[str]:
    import torch

    name = HF_DTYPES.get(dtype or "") or base_dtype or "float32"
    model = model.to(getattr(torch, name))
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = model.config.pad_token_id or tokenizer.pad_token_id
    with quiet_loading():  # transformers' "Writing model shards" bar: the export prints its own lines
        model.save_pretrained(out, max_shard_size=max_shard_size)
    _fix_tokenizer_limits(model, tokenizer)
    tokenizer.save_pretrained(out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    return [
        f"Merged weights in {name}, {len(shards)} safetensors file(s). Load with "
        f'`transformers.AutoModelForCausalLM.from_pretrained("{label}")`, or '
        f"`tunery chat --model {label}`; serve with `vllm serve {label}`.",
    ]


def stored_dtype(spec: str) -> str | None:
    """The weight type the base was published in (its config.json), so bf16 models stay bf16."""
    try:
        config = json.loads((resolve(spec).path / "config.json").read_text())
    except (OSError, ValueError, TuneryError):
        return None
    value = str(config.get("dtype") or config.get("torch_dtype") or "")
    return value if value in HF_DTYPES.values() else None


def _write_gguf(
    model: Any, tokenizer: Any, out: Path, source: Source, out_type: str, dtype: str | None
) -> list[str]:
    _fix_tokenizer_limits(model, tokenizer)
    stem = _slug(export_name(source))
    path = out / f"{stem}-{out_type}.gguf"
    summary = write_gguf(
        model,
        tokenizer,
        path,
        out_type,
        fallback_type=dtype if dtype in FLOAT_TYPES else "f16",
        name=stem,
        license=base_license(source.base),
        source_pre=_source_pre(source.base),
    )
    text, found = modelfile(path.name, tokenizer)
    (out / "Modelfile").write_text(text)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.tensor_types.items()))
    return [
        f"GGUF file `{path.name}` ({summary.arch}, {out_type}; tensors: {types}; pre-tokenizer "
        f"`{summary.pre_tokenizer}`; {summary.size_bytes / 1e6:.1f} MB).",
        "",
        f"- llama.cpp: `llama-cli -m {path.name} -cnv`",
        "- Ollama: `ollama create my-model -f Modelfile` "
        + (f"(template: {found.format.name})" if found else "(template taken from the GGUF)"),
        f"- Tunery: `tunery chat --model {path.name}`",
    ]


def export_name(source: Source) -> str:
    """A name for the exported file: the run's name for `run/model`, else the dir or base name."""
    if source.model_dir is None:
        return Path(source.base).stem
    path = source.model_dir.resolve()
    return path.parent.name if path.name == "model" else path.name


def _source_pre(base: str) -> str | None:
    """The pre-tokenizer name in the GGUF the base was converted from, if it came from one."""
    src = source_info(resolve(base).path).get("source")
    if not src or not Path(src).is_file():
        return None
    try:
        field = read_gguf(src).get_field("tokenizer.ggml.pre")
        return str(field.contents()) if field is not None else None
    except (OSError, ValueError):
        return None


def _write_adapter(source: Source, out: Path, model: str | None, dtype: str | None, label: str) -> list[str]:
    cfg = source.adapter_config()
    if cfg is None or source.model_dir is None:
        raise TuneryError(
            f"{source.model_dir or source.base} holds no PEFT adapter"
            + (f" (method {source.method!r} saves a full model)" if source.method else "")
            + ".",
            hint="Export it with --format hf (merged safetensors) or --format gguf.",
            code="not_an_adapter",
            param="format",
        )
    weights = source.model_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(
            f"{source.model_dir} has no adapter_model.safetensors (pickle .bin adapters are refused).",
            param="adapter",
        )
    # The base as the user names it for the target server (a hub id), else as Tunery recorded it
    # (PEFT records the local path it was loaded from, which means nothing on another machine).
    cfg["base_model_name_or_path"] = model or source.base
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if dtype is None:
        shutil.copy2(weights, out / weights.name)
    else:
        _cast_safetensors(weights, out / weights.name, dtype)
    for name in TOKENIZER_FILES:
        if (source.model_dir / name).is_file():
            shutil.copy2(source.model_dir / name, out / name)
    issues = vllm_issues(cfg)
    details = [
        f"PEFT adapter ({cfg.get('peft_type')}, r={cfg.get('r')}) for base "
        f"`{cfg['base_model_name_or_path']}`. Load with "
        f'`peft.PeftModel.from_pretrained(base, "{label}")`.',
        "",
        "vLLM: `vllm serve BASE --enable-lora --lora-modules my-adapter=PATH "
        f"--max-lora-rank {max(16, int(cfg.get('r') or 0))}`.",
    ]
    if issues:
        details += ["", "**vLLM will not load this adapter as is:**", *[f"- {i}" for i in issues]]
    return details


def _cast_safetensors(src: Path, dst: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, HF_DTYPES[dtype])
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def base_license(spec: str) -> str | None:
    """The base model's license: the builtin alias table, else the model card / GGUF metadata."""
    if spec in ALIASES:
        return ALIASES[spec].license
    try:
        return resolve(spec).license
    except TuneryError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _share(folder: Path) -> None:
    """mkdtemp makes a private 0700 dir; an export is meant to be shared like any saved model."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


__all__ = ["FORMATS", "GGUF_TYPES", "Source", "check_mergeable", "export", "load_merged"]
