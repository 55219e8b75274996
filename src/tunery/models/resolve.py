"""Turn a model spec into a Hugging Face directory that `from_pretrained` can load.

A spec is one of, tried in this order:
1. a builtin alias (`tunery.models.ALIASES`);
2. a local path: a Hugging Face directory (with `config.json`), a `.gguf` file, or a directory
   holding exactly one `.gguf` file;
3. a hub id (`org/name`), taken from the local Hugging Face cache, or downloaded when online.

GGUF files are dequantized once into a cached safetensors directory (see `gguf.py`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunery.errors import ModelError
from tunery.models.aliases import ALIASES, Alias, alias_list
from tunery.models.gguf import MARKER, cached_dir_for, ensure_converted, source_info

SpecKind = Literal["alias", "local", "gguf", "hub"]

# Hub ids are `name` or `org/name` of letters, digits, '-', '_' and '.'. Anything with more
# slashes, a leading '.', '/' or '~' is taken to be a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")

# What a hub download fetches: config, tokenizer and safetensors weights. Never pickle weights
# (they are refused anyway), nor the duplicate copies some repos keep in other formats.
HUB_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "README.md"]
HUB_IGNORE = [
    "original/*",
    "onnx/*",
    "openvino/*",
    "*/original/*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec made concrete. `path` is an HF directory usable by `from_pretrained`."""

    spec: str
    path: Path
    kind: SpecKind
    name: str
    license: str | None = None
    source: str | None = None  # the .gguf file or hub id the directory came from, if any


def resolve(spec: str | os.PathLike | ResolvedModel) -> ResolvedModel:
    """Resolve a model spec; raises `ModelError` (listing the builtin aliases) when it names nothing."""
    if isinstance(spec, ResolvedModel):
        return spec
    text = str(spec).strip()
    if not text:
        raise _unknown(text, "No model was given.")
    if text in ALIASES:
        return _resolve_alias(ALIASES[text])
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(text, path)
        raise _unknown(
            text,
            f"'{text}' is a file, but not a .gguf file; a model is a Hugging Face "
            "directory, a .gguf file, a hub id or a builtin alias.",
        )
    if path.is_dir():
        return _resolve_dir(text, path)
    if _HUB_ID.fullmatch(text) and not text.lower().endswith(".gguf"):
        return _resolve_hub(text)
    raise _unknown(text, f"No such file or directory: '{text}'.")


def is_model_path(path: Path) -> bool:
    """Whether `path` holds a model `resolve` would load from disk: a Hugging Face directory, a .gguf
    file, or a directory with exactly one .gguf file. Nothing is converted or read."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    if not path.is_dir():
        return False
    return (path / "config.json").is_file() or len(list(path.glob("*.gguf"))) == 1


def _resolve_alias(alias: Alias) -> ResolvedModel:
    where = alias.locate()
    if alias.fmt == "gguf":
        if alias.terms and not (cached_dir_for(where, alias.name) / MARKER).is_file():
            print(f"note: {alias.terms}", file=sys.stderr)  # once: on the use that converts it
        path = ensure_converted(where, alias.name)
        return ResolvedModel(alias.name, path, "alias", alias.name, alias.license, str(where))
    return ResolvedModel(alias.name, where, "alias", alias.name, alias.license)


def _resolve_gguf(spec: str, file: Path) -> ResolvedModel:
    path = ensure_converted(file, file.stem)
    return ResolvedModel(spec, path, "gguf", file.stem, source_info(path).get("license"), str(file.resolve()))


def _resolve_dir(spec: str, path: Path) -> ResolvedModel:
    if (path / "config.json").is_file():
        return ResolvedModel(spec, path.resolve(), "local", path.resolve().name, _readme_license(path))
    if (path / "adapter_config.json").is_file():
        base = _adapter_base(path)
        raise ModelError(
            f"'{spec}' is an adapter, not a base model.",
            hint=f"Pass it as the adapter (--adapter {spec})"
            + (f" on its base model '{base}'." if base else " together with its base model."),
            param="model",
        )
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_gguf(spec, ggufs[0])
    if ggufs:
        raise ModelError(
            f"'{spec}' holds several GGUF files: {', '.join(g.name for g in ggufs)}.",
            hint="Name the one to use, e.g. " + str(ggufs[0]),
            param="model",
        )
    raise ModelError(
        f"'{spec}' is a directory but not a Hugging Face model: it has no config.json.",
        hint="A model directory is what `save_pretrained` writes (config.json, *.safetensors and the "
        "tokenizer files). Builtin aliases: " + alias_list(),
        param="model",
    )


def _resolve_hub(hub_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                hub_id, local_files_only=True, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE
            )
        )
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError), or a bad id
        path = None
    if path is None and hub_offline():
        raise ModelError(
            f"Model '{hub_id}' is not a builtin alias or a local path, and it is not in the local "
            "Hugging Face cache; the hub is offline (HF_HUB_OFFLINE is set), so it cannot be downloaded.",
            hint="Use a builtin alias (" + alias_list() + "), a local model directory or .gguf file, or "
            "download the model on a connected machine and copy it here." + _did_you_mean(hub_id),
            code="model_not_found",
            param="model",
        )
    if path is None:
        path = _download(hub_id)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"The hub repo '{hub_id}' has no config.json; it is not a transformers model.",
            hint="Builtin aliases: " + alias_list(),
            param="model",
        )
    return ResolvedModel(hub_id, path, "hub", hub_id, _readme_license(path), hub_id)


def _download(hub_id: str) -> Path:
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE))
    except GatedRepoError:
        reason = "the repository is gated; accept its terms on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        reason = "no such repository (or it is private and no HF_TOKEN is set)"
    except LocalEntryNotFoundError as exc:  # raised when the hub cannot be reached at all
        cause = exc.__cause__
        reason = "the hub is unreachable" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    raise ModelError(
        f"Model '{hub_id}' is not a builtin alias or a local path, and it could not be fetched from "
        f"the Hugging Face hub: {reason}.",
        hint="Builtin aliases: "
        + alias_list()
        + ". Or give a local model directory or .gguf file."
        + _did_you_mean(hub_id),
        param="model",
    )


def hub_offline() -> bool:
    """Offline mode, read at call time: huggingface_hub reads its env vars once, at import."""
    truthy = {"1", "on", "yes", "true"}
    if any(
        os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unknown(spec: str, message: str) -> ModelError:
    return ModelError(
        message + " Builtin aliases: " + alias_list() + ".",
        hint=(
            "Give a builtin alias, a local Hugging Face directory, a .gguf file or a hub "
            "id (org/name)." + _did_you_mean(spec)
        ),
        param="model",
    )


def _did_you_mean(spec: str) -> str:
    close = difflib.get_close_matches(spec.lower(), list(ALIASES), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _adapter_base(path: Path) -> str | None:
    for name, key in (("tunery.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def _readme_license(path: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if there is one."""
    try:
        text = (path / "README.md").read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        return None
    match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if match:
        lic = re.search(r"^license:\s*['\"]?([^'\"\n]+)", match.group(1), re.M)
        if lic:
            return lic.group(1).strip()
    return None
