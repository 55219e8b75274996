"""The GGUF forms llama.cpp serves: a base or fully fine-tuned model as a GGUF file, a LoRA adapter as
a GGUF LoRA file. Written once into `$TUNERY_CACHE/serve-gguf/` and reused.

A model's file is keyed by its resolved directory and the size and modification time of its weight
files (as `models/gguf.py` keys conversions), plus the tensor type; an adapter's by the hash of its
weights and its base's key. Beside each model file a small JSON keeps what the decode loop needs and
llama.cpp does not say the same way: the ids that end a reply (the generation config's, the config's
and the tokenizer's, as the torch loop uses) and the context length. Files are written to a temp name
and renamed, under a file lock, so two processes never serve a half-written file.

The forms are a cache with a size limit (`--gguf-cache-mb`): every use marks a form as used (its
modification time), and `prune` deletes the least recently used until the forms fit, never one that an
engine has loaded. A deleted form is written again by the next request that needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import ModelError
from tunery.export.gguf_file import GGUF_TYPES, gguf_refusal, write_gguf
from tunery.export.gguf_lora import llamacpp_lora_issues, write_gguf_lora
from tunery.fsutil import file_lock, write_atomic
from tunery.generation.loading import load_for_inference
from tunery.generation.sequence import _context_limit, eos_token_ids
from tunery.methods.loading import read_info
from tunery.models.gguf import cache_root
from tunery.models.load_lock import LOAD_LOCK

FORMAT_VERSION = 1
FULL_METHODS = ("full", "freeze")  # saved as whole models: their weights are a plain causal LM


@dataclass(frozen=True)
class BaseForm:
    gguf: Path
    eos_ids: frozenset[int]
    context: int | None  # the model's own context length (max_position_embeddings)


def _weights_key(directory: Path) -> str:
    parts = []
    for f in sorted(directory.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def base_key_digest(key: str) -> str:
    spec, _, full_dir = key.partition("::")
    text = f"{key}|{_weights_key(Path(spec))}|{_weights_key(Path(full_dir)) if full_dir else ''}"
    return hashlib.sha256(f"{text}|v{FORMAT_VERSION}".encode()).hexdigest()[:16]


def forms_dir() -> Path:
    """Where the GGUF forms (and the llama.cpp probe verdicts) are kept."""
    root = cache_root() / "serve-gguf"
    root.mkdir(parents=True, exist_ok=True)
    return root


def base_refusal(key: str) -> str | None:
    """Why llama.cpp cannot serve this base key ("dir" or "dir::full-model dir"); None if it can."""
    from transformers import AutoConfig

    spec, _, full_dir = key.partition("::")
    if full_dir:
        method = read_info(full_dir).get("method")
        if method not in FULL_METHODS:
            return f"models trained with {method!r} keep modules a GGUF has no form for"
    try:
        cfg = AutoConfig.from_pretrained(full_dir or spec, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        return f"its config could not be read ({type(exc).__name__})"
    return gguf_refusal(cfg)


def adapter_refusal(adapter_dir: str) -> str | None:
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "its adapter_config.json could not be read"
    issues = llamacpp_lora_issues(cfg)
    return "; ".join(issues) if issues else None


def ensure_base(key: str, out_type: str) -> BaseForm:
    """The GGUF of base key `key` in tensor type `out_type`, written first if missing."""
    if out_type not in GGUF_TYPES:
        raise ModelError(f"Unknown GGUF type {out_type!r}: use one of {', '.join(GGUF_TYPES)}.")
    path = forms_dir() / f"{base_key_digest(key)}-{out_type}.gguf"
    meta = path.with_suffix(".json")
    with file_lock(path.with_name(f".{path.name}.lock"), "writing this GGUF base"):
        if not (path.is_file() and meta.is_file()):
            spec, _, full_dir = key.partition("::")
            with LOAD_LOCK:
                model, tokenizer = load_for_inference(spec, full_dir or None)
            facts = {"eos": sorted(eos_token_ids(model, tokenizer)), "context": _context_limit(model)}
            write_gguf(model.cpu(), tokenizer, path, out_type, fallback_type="f32")
            del model
            write_atomic(meta, json.dumps(facts))
        facts = json.loads(meta.read_text())  # under the lock: `prune` deletes under it too
        _used(path)
    return BaseForm(path, frozenset(facts["eos"]), facts["context"])


def ensure_adapter(key: str, adapter_dir: str, base_config: Any) -> Path:
    """The GGUF LoRA form of `adapter_dir` for base key `key`, written first if missing."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    digest = hashlib.sha256()
    digest.update((Path(adapter_dir) / "adapter_config.json").read_bytes())
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{base_key_digest(key)}|v{FORMAT_VERSION}".encode())
    path = forms_dir() / f"lora-{digest.hexdigest()[:16]}.gguf"
    with file_lock(path.with_name(f".{path.name}.lock"), "writing this GGUF adapter"):
        if not path.is_file():
            write_gguf_lora(Path(adapter_dir), base_config, path)
        _used(path)
    return path


def _used(path: Path) -> None:
    """Mark a form as used now; `prune` deletes the least recently used first."""
    try:
        os.utime(path)
    except OSError:  # pruned by another process meanwhile: the next use writes it again
        pass


def prune(limit_mb: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete GGUF forms, least recently used first, until all of them (with their JSON facts) take at
    most `limit_mb` MB; 0 is no limit. The forms in `keep`, those an engine has loaded, are never
    deleted, so the cache can stay above the limit while they are loaded. Only finished forms are seen
    (a form being written has a temp name); each is deleted under the lock its writer and readers take,
    and a process that has a deleted form mapped keeps its pages. Returns the deleted forms."""
    if limit_mb <= 0:
        return []
    kept = {Path(k).resolve() for k in keep}
    forms = []
    for gguf in forms_dir().glob("*.gguf"):
        meta = gguf.with_suffix(".json")
        try:
            st = gguf.stat()
            size = st.st_size + (meta.stat().st_size if meta.is_file() else 0)
        except OSError:  # deleted by another process meanwhile
            continue
        forms.append((st.st_mtime_ns, gguf, size))
    total, limit, deleted = sum(size for _, _, size in forms), limit_mb * 2**20, []
    for _, gguf, size in sorted(forms):
        if total <= limit:
            break
        if gguf.resolve() in kept:
            continue
        with file_lock(gguf.with_name(f".{gguf.name}.lock"), "using this GGUF form"):
            gguf.unlink(missing_ok=True)
            gguf.with_suffix(".json").unlink(missing_ok=True)
        total -= size
        deleted.append(gguf)
    return deleted
