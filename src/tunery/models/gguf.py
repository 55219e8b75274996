"""GGUF files, converted once into a cached safetensors directory.

Transformers dequantizes a GGUF on every `from_pretrained(..., gguf_file=)`, which takes about 20 s
for SmolLM2-135M here, against about 1 s for the same weights as safetensors. So the first use writes
a plain Hugging Face directory (weights, config, tokenizer, chat template, generation config) under
`$TUNERY_CACHE/models/<name>-<hash>/` and every later use loads that.

The directory is built in a temp dir beside it and renamed into place, so a reader never sees a
half-written model; a file lock makes a second process wait for the first instead of converting the
same file again (and if locks are unavailable, the first rename wins and the loser's copy is dropped).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunery.errors import ModelError
from tunery.fsutil import file_lock
from tunery.models.load_lock import LOAD_LOCK
from tunery.quiet import quiet_loading

log = logging.getLogger(__name__)

# Bump when the layout of a converted directory changes, so old caches are not reused.
FORMAT_VERSION = 1
MARKER = "tunery-source.json"


def cache_root() -> Path:
    """`$TUNERY_CACHE`, default `~/.cache/tunery`."""
    return Path(os.environ.get("TUNERY_CACHE") or Path.home() / ".cache" / "tunery").expanduser()


def cached_dir_for(gguf: Path, name: str) -> Path:
    """Where the converted copy of `gguf` lives.

    The key is the file's real path, size and modification time rather than a content hash: hashing
    a multi-GB file would cost more than the cached load it is meant to speed up.
    """
    gguf = gguf.resolve()
    st = gguf.stat()
    key = f"{gguf}|{st.st_size}|{st.st_mtime_ns}|v{FORMAT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return cache_root() / "models" / f"{slug}-{digest}"


def ensure_converted(gguf: Path, name: str) -> Path:
    """The cached HF directory for `gguf`, converting it first if no complete copy exists."""
    out = cached_dir_for(gguf, name)
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock", "converting this model"):
        if (out / MARKER).is_file():  # another process finished while we waited
            return out
        # With the lock held nobody else is building this entry: temp dirs left by a killed
        # conversion are garbage.
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            convert_gguf(gguf, tmp)
            # Without locks (Windows) another writer may have finished meanwhile: the first rename
            # wins and later copies are dropped. A directory without its marker is incomplete.
            if out.exists() and not (out / MARKER).is_file():
                shutil.rmtree(out, ignore_errors=True)
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` through transformers' GGUF loader and save it as a plain HF directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    log.info("Converting %s to safetensors (once; later loads use the cache)", gguf)
    folder, fname = str(gguf.parent), gguf.name
    try:
        with _one_reader(gguf):  # one parse of the header for the tokenizer, the config and the weights
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            # dequantize=True: for architectures with packed GGUF kernels transformers would otherwise
            # keep the weights in quantized blocks, which cannot be trained or saved as safetensors.
            # quiet_loading: transformers' per-tensor bars would print into Tunery's output.
            with LOAD_LOCK, quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(
                    folder,
                    gguf_file=fname,
                    dtype=torch.float32,
                    quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
                )
    except (ValueError, KeyError, OSError, IndexError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"Could not read the GGUF file {gguf}: {reason}",
            hint="Tunery reads GGUF files through transformers' loader, which supports the common "
            "decoder architectures (llama, mistral, qwen2, qwen3, phi3, gemma, ...).",
            param="model",
        ) from None
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ModelError(
            f"{gguf}: transformers kept some weights packed ({', '.join(packed)}).",
            hint="Upgrade transformers, or convert the file to safetensors yourself.",
            param="model",
        )
    drop_quantizer(model)
    # A GGUF tokenizer does not know the context length; without this it reports ~1e30.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    with quiet_loading():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _share(out)
    seconds = round(time.perf_counter() - start, 2)
    # The marker is written last: its presence means the directory is complete.
    (out / MARKER).write_text(
        json.dumps(
            {
                "source": str(gguf.resolve()),
                "size": gguf.stat().st_size,
                "format_version": FORMAT_VERSION,
                "license": _gguf_metadata(gguf).get("general.license"),
                "transformers": transformers.__version__,
                "converted_at": int(time.time()),
                "seconds": seconds,
            },
            indent=2,
        )
    )
    log.info("Converted %s in %.1f s", gguf.name, seconds)


def read_gguf(path: str | os.PathLike) -> Any:
    """`gguf.GGUFReader(path)`, parsed about 3x faster (`_plain_reader_class`)."""
    return _plain_reader_class()(path)


@functools.cache
def _plain_reader_class() -> type:
    """gguf.GGUFReader over a plain ndarray view of its memory map. The reader slices its `data` once
    or more for every value of the header, and slicing an `np.memmap` runs the subclass's Python
    `__array_finalize__` each time: Gemma 3's 262k-entry token arrays took 25 s to parse here, 8.8 s
    through the plain view, with the same fields and tensors (tests/test_models.py)."""
    import gguf
    import numpy as np

    class PlainGGUFReader(gguf.GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:  # the memmap the base __init__ opens; the view keeps it open
            self._plain = value.view(np.ndarray)

    return PlainGGUFReader


_SHARED: dict[str, Any] = {}  # GGUF path -> its one reader, while a conversion of it runs
_SHARED_LOCK = threading.Lock()
_ORIGINAL_READER: list[Any] = []


@contextmanager
def _one_reader(path: Path) -> Iterator[None]:
    """Within the block, transformers' GGUF loader gets one shared reader of `path`.

    Transformers parses the whole header (the tokenizer's arrays too) once for the tokenizer, once for
    the config and once for the weights: three times 25 s for Gemma 3 here. Its loader looks up
    `gguf.GGUFReader` when called, so the name is swapped for the duration; other paths and other
    modes still get a reader of their own."""
    import gguf

    key, reader = str(Path(path).resolve()), read_gguf(path)
    with _SHARED_LOCK:
        if not _ORIGINAL_READER:
            _ORIGINAL_READER.append(gguf.GGUFReader)
            original = _ORIGINAL_READER[0]

            def shared(p: Any, mode: str = "r") -> Any:
                found = _SHARED.get(str(Path(p).resolve())) if mode == "r" else None
                return found if found is not None else original(p, mode)

            gguf.GGUFReader = shared
        _SHARED[key] = reader
    try:
        yield
    finally:
        with _SHARED_LOCK:
            _SHARED.pop(key, None)
            if not _SHARED and _ORIGINAL_READER:
                gguf.GGUFReader = _ORIGINAL_READER.pop()


def _share(folder: Path) -> None:
    """mkdtemp makes a private 0700 dir; a shared cache should follow the umask like any download."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def source_info(converted: Path) -> dict:
    """What the conversion marker of a cached directory records (source file, license, timing)."""
    try:
        return json.loads((converted / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _gguf_metadata(gguf: Path) -> dict:
    """The file's scalar metadata (general.license, ...); best effort, it is informational only."""
    try:
        # transformers' header reader skips the tensor data and the big token arrays.
        from transformers.integrations.gguf.reader import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(gguf))
    except Exception:  # an internal API of transformers: its absence must not fail a conversion
        return {}
    return {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}


def drop_quantizer(model) -> None:
    """Make a dequantized GGUF model an ordinary one, so `save_pretrained` accepts it.

    The weights are already dense float tensors; only the tags remain: the model's `hf_quantizer`
    (whose `is_serializable()` is False for GGUF) and the config's `quantization_config`, which
    would otherwise be saved and make the next load look for a GGUF file again.
    """
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if "quantization_method" in vars(model):
        model.quantization_method = None
    for config in {
        id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c
    }.values():
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if attr in vars(config):
                delattr(config, attr)
        if "_is_quantized" in vars(config):
            config._is_quantized = False
