"""Serving engines behind `/v1/chat/completions` and `/v1/completions`, and the choice between them.

- `torch`: Tunery's own decode loop (`generation/engine.py`). It runs every method Tunery trains.
- `llamacpp`: llama.cpp through llama-cpp-python (`llamacpp.py`), for base models, fully fine-tuned
  models and plain LoRA adapters whose architecture has a GGUF form. Two to five times faster on a CPU.
- `vllm`: vLLM on a GPU (`vllm.py`); its request translation is tested, the engine needs vLLM installed.

`tunery serve --engine auto` (the default) serves each model with llama.cpp where llama.cpp can run
it and the machine has no GPU, and with torch otherwise; `/v1/models` says which engine serves what.
All engines share the request semantics: the same tokenizer, sampler, stop strings, `n`, logprobs,
seeds, usage counts and finish reasons, because only the forward pass differs.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
from importlib.metadata import version
from typing import Any

from fastapi import Request

from tunery.errors import ConfigError, ModelError, TuneryError
from tunery.export.gguf_file import ARCHITECTURES
from tunery.generation.engine import Engine, request_key
from tunery.generation.sequence import GenerationParams
from tunery.models.aliases import ALIASES
from tunery.models.gguf import MARKER, cache_root, cached_dir_for, read_gguf
from tunery.models.placement import inference_device
from tunery.serve.engines import llamacpp
from tunery.serve.engines.gguf_forms import adapter_refusal, base_refusal
from tunery.serve.engines.scoring import TorchEngine
from tunery.serve.engines.vllm import VllmEngine

log = logging.getLogger("tunery.serve")
ENGINES = ("auto", "torch", "llamacpp", "vllm")


def get_engine(state: Any) -> EngineRouter:
    """The app's engine router; made on first use, so a training-only server loads no model code."""
    with state.engine_lock:
        if state._engine is None:
            settings = state.settings
            state._engine = EngineRouter(
                settings.engine,
                adapter_cache=settings.adapter_cache,
                gguf_type=settings.gguf_type,
                cache_mb=settings.gguf_cache_mb,
            )
        return state._engine


def serving_engine(request: Request) -> EngineRouter:
    """FastAPI dependency: the engine router of the app handling `request`."""
    return get_engine(request.app.state)


def startup_line(kind: str) -> str:
    """What `tunery serve` prints about its engine before serving; a ConfigError where the named
    engine cannot run here."""
    if kind == "torch":
        return "engine: torch (Tunery's decode loop)"
    if kind == "vllm":
        VllmEngine.check_available()
        return "engine: vLLM"
    why = llamacpp.available()
    if why is None:
        return (
            f"engine: llama.cpp (llama-cpp-python {version('llama-cpp-python')}) for every model it can "
            "run, torch for the rest; GET /v1/models says which serves what"
        )
    if kind == "llamacpp":
        EngineRouter("llamacpp")  # raises the ConfigError that says how to install it
    pid = cache_root() / "llamacpp-build.pid"
    if _running(pid):
        return (
            "engine: torch for now: llama.cpp is still building in the background (log: "
            f"{pid.with_suffix('.log')}); restart `tunery serve` once it has finished"
        )
    return (
        "engine: torch: llama-cpp-python is not installed; `pip install 'tunery[llamacpp]'` builds "
        "llama.cpp (minutes) for two to five times faster replies on a CPU"
    )


def _unconverted_gguf_arch(spec: str | None) -> str | None:
    """The llama.cpp architecture of a builtin GGUF model whose converted copy is not cached yet (read
    from the GGUF's header); None for anything else."""

    alias = ALIASES.get(spec) if spec else None
    if alias is None or alias.fmt != "gguf":
        return None
    try:
        where = alias.locate()
    except Exception:  # noqa: BLE001 - not installed: the normal path reports it
        return None
    if (cached_dir_for(where, alias.name) / MARKER).is_file():
        return None
    return _gguf_architecture(str(where))


@functools.lru_cache(maxsize=16)
def _gguf_architecture(path: str) -> str:
    """`general.architecture` of a GGUF file. It is the first key llama.cpp's and the `gguf` package's
    writers put in the header, so reading that far is enough; gguf.GGUFReader parses the whole
    header (the tokenizer's arrays too: seconds), which is the fallback."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head[:4] == b"GGUF" and len(head) >= 32:
        key_len = struct.unpack_from("<Q", head, 24)[0]
        at = 32 + key_len
        if head[32:at] == b"general.architecture" and struct.unpack_from("<I", head, at)[0] == 8:
            size = struct.unpack_from("<Q", head, at + 4)[0]
            return head[at + 12 : at + 12 + size].decode()
    field = read_gguf(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _running(pidfile: Any) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


class EngineRouter:
    """The engine API (`tokenizer`, `vocab_size`, `check`, `submit`) over several engines: each request
    goes to the engine chosen for its model and adapter, decided once per pair and remembered."""

    def __init__(self, kind: str = "auto", *, adapter_cache: int = 8, gguf_type: str = "f32", **cpp: Any):
        if kind not in ENGINES:
            raise ConfigError(f"Unknown --engine {kind!r}: use {', '.join(ENGINES)}.", param="engine")
        self.kind = kind
        self.notice: str | None = None  # why `auto` serves everything with torch, shown once
        self._torch: TorchEngine | None = None
        self._cpp: Any = None
        self._adapter_cache = adapter_cache
        self._lock = threading.RLock()
        self._resolved: dict[str, str] = {}
        self._choice: dict[tuple[str, str | None], tuple[str, str | None]] = {}
        if kind == "vllm":
            self._vllm = VllmEngine()  # refuses clearly where vLLM or a GPU is missing
        elif kind in ("auto", "llamacpp"):
            self._cpp = self._make_cpp(kind, gguf_type, cpp)

    def _make_cpp(self, kind: str, gguf_type: str, options: dict[str, Any]) -> Any:
        why = llamacpp.available()
        if why is None and kind == "auto" and inference_device().type != "cpu":
            why = "a GPU is present, and llama.cpp here is built for CPUs"
        if why is not None:
            if kind == "llamacpp":
                raise ConfigError(
                    f"--engine llamacpp: {why}.",
                    hint="Install it with `pip install llama-cpp-python` (it builds llama.cpp; minutes), "
                    "or serve with --engine torch.",
                    param="engine",
                )
            self.notice = f"serving with the torch engine: {why}"
            return None
        return llamacpp.LlamaCppEngine(gguf_type=gguf_type, max_adapters=self._adapter_cache, **options)

    @property
    def torch(self) -> TorchEngine:
        with self._lock:
            if self._torch is None:
                self._torch = TorchEngine(max_adapters=self._adapter_cache)
            return self._torch

    # ----- which engine -----
    def engine_name(
        self, model_spec: str | None, adapter_dir: str | None, *, cheap: bool = False
    ) -> tuple[str, str | None]:
        """("llamacpp" | "torch" | "vllm", why not llama.cpp or None) for a model and adapter. With
        `cheap` (listing models), a builtin GGUF model not yet converted is judged by its GGUF's
        architecture instead of converting it (seconds) first."""
        if self.kind == "vllm":
            return "vllm", None
        if self._cpp is None:
            return "torch", self.notice
        arch = _unconverted_gguf_arch(model_spec) if cheap else None
        if arch is not None:
            why = None if arch in ARCHITECTURES.values() else f"no GGUF layout for {arch!r}"
            why = why or (adapter_refusal(adapter_dir) if adapter_dir else None)
            return ("torch", f"llama.cpp cannot run it: {why}") if why else ("llamacpp", None)
        with self._lock:
            key, adapter = request_key(model_spec, adapter_dir, self._resolved)
            if (key, adapter) not in self._choice:
                self._choice[(key, adapter)] = self._decide(key, adapter)
            return self._choice[(key, adapter)]

    def _decide(self, key: str, adapter: str | None) -> tuple[str, str | None]:
        why = base_refusal(key) or (adapter_refusal(adapter) if adapter else None)
        return ("torch", f"llama.cpp cannot run it: {why}") if why else ("llamacpp", None)

    def _engine(self, model_spec: str | None, adapter_dir: str | None) -> Any:
        name, _ = self.engine_name(model_spec, adapter_dir)
        if name == "vllm":
            return self._vllm
        return self._cpp if name == "llamacpp" else self.torch

    def _fall_back(self, model_spec: str | None, adapter_dir: str | None, exc: ModelError) -> Engine:
        """llama.cpp failed to take a model it looked able to run (a conversion it refused): serve
        that model with torch from now on, and say why once."""
        with self._lock:
            key = request_key(model_spec, adapter_dir, self._resolved)
            self._choice[key] = ("torch", f"llama.cpp could not load it: {exc.message}")
        log.warning("serving %s with the torch engine: %s", key[0], exc.message)
        return self.torch

    def _call(self, method: str, model_spec: str | None, adapter_dir: str | None, *args: Any) -> Any:
        engine = self._engine(model_spec, adapter_dir)
        try:
            return getattr(engine, method)(model_spec, adapter_dir, *args)
        except ModelError as exc:
            if engine is not self._cpp or engine is None:
                raise
            torch = self._fall_back(model_spec, adapter_dir, exc)
            return getattr(torch, method)(model_spec, adapter_dir, *args)

    def prepare(self, model_spec: str | None, adapter_dir: str | None) -> str:
        """Write the serving form of a model ahead of its first request; returns its engine's name."""
        name, _ = self.engine_name(model_spec, adapter_dir)
        if name == "llamacpp":
            try:
                self._cpp.prepare(model_spec, adapter_dir)
            except ModelError as exc:
                self._fall_back(model_spec, adapter_dir, exc)
                return "torch"
        return name

    # ----- the engine API -----
    def tokenizer(self, model_spec: str | None, adapter_dir: str | None = None) -> Any:
        return self._call("tokenizer", model_spec, adapter_dir)

    def vocab_size(self, model_spec: str | None, adapter_dir: str | None = None) -> int:
        return self._call("vocab_size", model_spec, adapter_dir)

    def check(
        self,
        model_spec: str | None,
        adapter_dir: str | None,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        echo: bool = False,
    ) -> GenerationParams:
        return self._target(model_spec, adapter_dir, prompt_ids, params, echo).check(
            model_spec, adapter_dir, prompt_ids, params
        )

    def submit(
        self,
        model_spec: str | None,
        adapter_dir: str | None,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        echo: bool = False,
    ) -> Any:
        return self._target(model_spec, adapter_dir, prompt_ids, params, echo).submit(
            model_spec, adapter_dir, prompt_ids, params
        )

    def score(self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], top: int) -> Any:
        """Prompt token logprobs (`echo`), always from the torch engine: a handle whose result is
        `[PromptScores]`. The completion of an echo request is decoded by torch too (`echo=True` on
        `submit`), so prompt and completion logprobs come from one model."""
        if self.kind == "vllm":
            raise TuneryError(
                "echo is not supported with --engine vllm; serve with --engine torch or auto.",
                code="unsupported_parameter",
                param="echo",
            )
        return self.torch.score(model_spec, adapter_dir, prompt_ids, top)

    def _target(
        self,
        model_spec: str | None,
        adapter_dir: str | None,
        prompt_ids: list[int],
        params: GenerationParams,
        echo: bool = False,
    ) -> Any:
        """The engine for one request: llama.cpp keeps a fixed KV size per sequence, so a request that
        needs more context than it has goes to torch, which decodes up to the model's own limit; an
        echo request goes to torch, which scores its prompt."""
        engine = self._engine(model_spec, adapter_dir)
        if echo and engine is self._cpp and engine is not None:
            return self.torch
        if engine is not self._cpp or engine is None:
            return engine
        try:
            limit = engine.context(model_spec, adapter_dir)
        except ModelError as exc:
            return self._fall_back(model_spec, adapter_dir, exc)
        # torch clips the reply to, or refuses the prompt at, the model's own context length
        return engine if len(prompt_ids) + params.max_new_tokens <= limit else self.torch

    def close(self) -> None:
        for engine in (self._cpp, self._torch, getattr(self, "_vllm", None)):
            if engine is not None:
                engine.close()
