"""Tokenize a dataset once and keep the features on disk.

The key is sha256 over the data (its file hash, format and kind), the tokenizer's fingerprint
(name, vocabulary, special tokens, chat template) and the caller's settings (max_length,
train_on_prompt, objective...), plus the encode function's name. Change any of them and the
features are recomputed; nothing needs invalidating by hand.

Files are gzipped JSON (never pickle: a cache directory may be shared, and loading a pickle runs
code), written to a temporary file and renamed, so a crash mid-write never leaves a half file that
a later run would trust. A damaged file is treated as a miss and rewritten.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from tunery.data.types import Dataset

log = logging.getLogger("tunery.data")
CACHE_VERSION = 1  # bump when the feature layout of encode functions changes


def cache_dir() -> Path:
    """`$TUNERY_CACHE/tokenized`, default `~/.cache/tunery/tokenized`."""
    root = os.environ.get("TUNERY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunery")
    return Path(root) / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids or template text."""
    template = getattr(tokenizer, "chat_template", None)
    parts = {
        "name": getattr(tokenizer, "name_or_path", ""),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "vocab": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "template": hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _data_hash(dataset: Dataset) -> str:
    if dataset.content_hash:
        return dataset.content_hash
    # Built in memory: hash the examples themselves.
    rows = [asdict(x) if is_dataclass(x) and not isinstance(x, type) else x for x in dataset.examples]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def _fn_name(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(inner, '__module__', '')}.{getattr(inner, '__qualname__', type(inner).__name__)}"


def cache_key(
    dataset: Dataset, tokenizer: Any, encode_fn: Callable[..., Any], settings: dict[str, Any]
) -> str:
    payload = {
        "version": CACHE_VERSION,
        "data": _data_hash(dataset),
        "format": dataset.format,
        "kind": dataset.kind,
        "n": len(dataset),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "encode": _fn_name(encode_fn),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_encode(
    dataset: Dataset,
    tokenizer: Any,
    encode_fn: Callable[[Any], dict[str, Any] | None],
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Features of every example (`encode_fn(example)`, None results dropped), from the cache when
    this data, tokenizer and settings were encoded before. Features must be JSON-serializable."""
    key = cache_key(dataset, tokenizer, encode_fn, settings)
    path = cache_dir() / f"{key}.json.gz"
    if path.exists():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                stored = json.load(fh)
            if stored.get("key") == key:
                log.info("tokenized cache hit: %s (%d examples)", path.name, len(stored["features"]))
                return stored["features"]
        except (OSError, EOFError, ValueError, KeyError):
            log.warning("tokenized cache file %s is damaged; re-encoding", path)
    features = [f for f in (encode_fn(x) for x in dataset.examples) if f is not None]
    _write_atomic(path, {"key": key, "settings": settings, "data": dataset.path, "features": features})
    return features


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only cache must not stop training
        log.warning("cannot write the tokenized cache in %s: %s", path.parent, exc)
        return
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3) as gz:
            gz.write(json.dumps(payload, separators=(",", ":"), default=_not_json).encode())
        os.replace(tmp, path)
    except (OSError, TypeError) as exc:
        log.warning("not caching tokenized features (%s)", exc)
        Path(tmp).unlink(missing_ok=True)


def _not_json(value: Any) -> Any:
    raise TypeError(f"encode_fn returned a {type(value).__name__}; cached features must be JSON values")
