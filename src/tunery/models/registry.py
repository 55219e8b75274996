"""What the model registry records about a model, read from its files: where its weights are, their
sha256, and the facts `tunery models info` shows. The table itself lives with the jobs database
(`serve/model_registry.py`); this module reads files only: config.json, safetensors headers and the
bytes it hashes. No model is loaded.

A source is one of:
- a local Hugging Face directory (config.json and *.safetensors);
- a `.gguf` file, or a directory holding exactly one, converted once into the cache as `resolve`
  does, so that it loads like any other model;
- a hub id (`org/name`) already in the local Hugging Face cache; `pull` puts it there when online.

The weights must be safetensors (pickle files can run code when loaded) and of an architecture
transformers knows: a model that needs its repository's own code is refused, because
`trust_remote_code` stays off.

The sha256 of a directory covers its *.safetensors files: the sha256 of the lines
"<sha256 of the file>  <file name>\\n", sorted by name, which is what
`sha256sum *.safetensors | sha256sum` prints there. A .gguf source's is the file's own sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunery.errors import ModelError
from tunery.models.aliases import ALIASES
from tunery.models.load import check_safetensors, model_info
from tunery.models.resolve import _HUB_ID, HUB_ALLOW, HUB_IGNORE, ResolvedModel, hub_offline, resolve

SourceKind = Literal["local", "gguf", "hub"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceFacts:
    """A model source made concrete: what the registry stores about it."""

    source: str  # an absolute path (directory or .gguf file) or a hub id
    kind: SourceKind
    sha256: str
    license: str | None
    chat_template: bool
    architecture: str | None
    model_type: str | None
    model_kind: str  # causal-lm, encoder or other (tunery.models.load.model_kind)
    parameters: int | None
    context_length: int | None


def inspect_source(source: str) -> SourceFacts:
    """Check that `source` is a model Tunery may register and read its facts; raises `ModelError`
    naming what is wrong (no such path, pickle-only weights, custom code, a hub id not pulled)."""
    model, weights, kind = locate(source)
    check_safetensors(model)
    _check_native(model)
    info = model_info(model)
    return SourceFacts(
        source=str(weights) if kind != "hub" else model.spec,
        kind=kind,
        sha256=weights_sha256(weights),
        license=info["license"],
        chat_template=bool(info["has_chat_template"]),
        architecture=info["architecture"],
        model_type=info["model_type"],
        model_kind=info["model_kind"],
        parameters=info["n_params"],
        context_length=info["max_positions"],
    )


def locate(source: str) -> tuple[ResolvedModel, Path, SourceKind]:
    """(the resolved model, the weights to hash, the kind of source). Hub ids are looked up in the
    local cache only: nothing is downloaded here."""
    text = str(source).strip()
    if not text:
        raise ModelError("No model source was given.", param="source")
    if text in ALIASES:
        raise ModelError(
            f"'{text}' is a builtin model already; it needs no registering.",
            hint="Requests and jobs name it as it is.",
            code="invalid_source",
            param="source",
        )
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            path = ggufs[0] if len(ggufs) == 1 else path  # resolve explains the other cases
        if path.is_file() and path.suffix.lower() != ".gguf":
            raise ModelError(
                f"'{text}' is a file, but not a .gguf file; a model source is a Hugging Face "
                "directory, a .gguf file or a hub id.",
                code="invalid_source",
                param="source",
            )
        model = resolve(str(path))  # converts a .gguf file once; explains an adapter or a bare dir
        return model, path, "gguf" if path.is_file() else "local"
    if is_hub_id(text):
        cached = cached_hub_dir(text)
        if cached is None:
            raise ModelError(
                f"The hub model '{text}' is not in the local Hugging Face cache.",
                hint=f"Download it first: tunery models pull NAME {text}",
                code="model_not_pulled",
                param="source",
            )
        return resolve(text), cached, "hub"
    raise ModelError(
        f"No such file or directory: '{text}'; a model source is a Hugging Face directory, a .gguf "
        "file or a hub id (org/name).",
        code="invalid_source",
        param="source",
    )


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub id, org/name."""
    return "/" in text and _HUB_ID.fullmatch(text) is not None


def cached_hub_dir(hub_id: str) -> Path | None:
    """The snapshot of `hub_id` in the local Hugging Face cache, or None; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                hub_id, local_files_only=True, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE
            )
        )
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError), or a bad id
        return None


def pull(hub_id: str) -> None:
    """Download `hub_id` (config, tokenizer, safetensors; never pickle) into the Hugging Face cache,
    unless it is there already. Offline, a model not in the cache is a clear error, not a hang."""
    text = str(hub_id).strip()
    if not is_hub_id(text) or Path(text).expanduser().exists():
        raise ModelError(
            f"'{text}' is not a hub id; pull takes one like org/name.",
            hint="Register a local directory or .gguf file with: tunery models add NAME PATH",
            code="invalid_source",
            param="hub_id",
        )
    if cached_hub_dir(text) is not None:
        return
    if hub_offline():
        raise ModelError(
            f"Cannot pull '{text}': this machine is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
            "is set) and the model is not in the local Hugging Face cache.",
            hint=f"Pull it on a connected machine (tunery models pull NAME {text}) and copy its "
            "Hugging Face cache here, or register a local directory: tunery models add NAME PATH",
            code="hub_offline",
            param="hub_id",
        )
    resolve(text)  # downloads, and names the reason when the hub refuses (gated, missing, unreachable)


def weights_sha256(weights: Path) -> str:
    """The sha256 of a .gguf file, or of a directory's *.safetensors files (see the module doc)."""
    weights = Path(weights)
    if weights.is_file():
        return _file_sha256(weights)
    files = sorted(weights.glob("*.safetensors"), key=lambda p: p.name)
    lines = "".join(f"{_file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def current_sha256(source: str, kind: SourceKind) -> str | None:
    """The sha256 of the weights a registered source points at now; None when they are gone."""
    if kind == "hub":
        where = cached_hub_dir(source)
    else:
        where = Path(source) if Path(source).exists() else None
    try:
        return weights_sha256(where) if where is not None else None
    except OSError:
        return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_native(model: ResolvedModel) -> None:
    """Refuse a model whose architecture transformers does not know: loading it would need the code
    in its repository, and Tunery never runs that (`trust_remote_code` stays off)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((Path(model.path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Cannot read the config.json of '{model.spec}': {exc}", code="invalid_source", param="source"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type or model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"'{model.spec}' has model_type {model_type!r}, which transformers does not know: loading it "
            "would run custom code from its repository, and Tunery keeps trust_remote_code off.",
            hint="Register a model of an architecture transformers supports (Llama, Qwen, Gemma, "
            "Mistral, Phi, ...).",
            code="remote_code_refused",
            param="source",
        )
