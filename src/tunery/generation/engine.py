"""The inference engine behind the server and `tunery chat`: loaded bases, an LRU of adapters, batching.

One background worker owns every model and runs every forward pass, so model state (which adapter is
active) is never touched by two threads. Callers `submit` requests from any thread and get a handle
back. The worker takes the waiting requests that share a base (and an adapter, or several LoRA adapters
at once through peft's `adapter_names=`) and decodes them together with the same loop as
`generate_batch`. Adapters are loaded onto the base once with peft's `load_adapter` and switched with
`set_adapter`, so changing adapter never reloads the base; the least recently used one is deleted when
the cache is full.
"""

from __future__ import annotations

import functools
import hashlib
import json
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import ModelError, TuneryError
from tunery.generation.generate import decode_steps
from tunery.generation.loading import adapter_base, is_peft_adapter, load_for_inference, model_dir
from tunery.generation.sequence import GenerationParams, GenerationResult, _check_context, _Seq
from tunery.models.load_lock import LOAD_LOCK
from tunery.models.placement import place
from tunery.models.resolve import resolve as resolve_model
from tunery.quiet import quiet_loading

Loader = Callable[[str, str | None], tuple[Any, Any]]


@dataclass
class StreamEvent:
    index: int  # which of the request's n choices
    text: str  # new text (may be empty on the final event)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # set on the choice's last event


_END = object()


class GenerationHandle:
    """A submitted request: wait for `result()`, or consume `events()` / `text_stream()` as it decodes."""

    def __init__(self, n: int):
        self._queue: queue.Queue[Any] = queue.Queue()
        self._results: list[GenerationResult] = []
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.cancelled = False

    def _push(self, event: StreamEvent) -> None:
        self._queue.put(event)

    def _finish(self, results: list[GenerationResult]) -> None:
        self._results = sorted(results, key=lambda r: r.index)
        self._done.set()
        self._queue.put(_END)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._queue.put(_END)

    def cancel(self) -> None:
        """Stop decoding this request (a client went away); its results end with what was decoded."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> list[GenerationResult]:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        return self._results

    def events(self) -> Iterator[StreamEvent]:
        while True:
            item = self._queue.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def text_stream(self) -> Iterator[str]:
        """Text deltas of the first choice."""
        for event in self.events():
            if event.index == 0 and event.text:
                yield event.text


@dataclass
class _Request:
    base_key: str
    adapter: str | None  # a PEFT adapter dir shared on the base, else None
    prompt: list[int]
    params: GenerationParams
    handle: GenerationHandle
    seqs: list[_Seq] = field(default_factory=list)
    emitted: bool = False  # some of its reply was streamed: it cannot be decoded again from the start


@dataclass
class _Base:
    model: Any
    tokenizer: Any
    peft: Any = None  # the PeftModel wrapping `model` once an adapter is loaded
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # name -> dir, LRU order


def adapter_name(path: str) -> str:
    """A stable peft adapter name for a directory (peft names may not contain dots)."""
    return "a" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _plain_lora(path: str | None) -> bool:
    if path is None:
        return True
    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("peft_type") == "LORA" and not cfg.get("use_dora") and not cfg.get("modules_to_save")


def embedding_rows(model: Any) -> int:
    """How many token ids the model can embed (the vocabulary, padded rows included)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    return int(rows if rows is not None else model.config.vocab_size)


def check_token_ids(prompt_ids: list[Any], vocab: int, param: str = "prompt") -> None:
    """Refuse ids outside [0, vocab) before they reach a batch: they index past the embedding table,
    which fails every request decoded with them (on CUDA, a device assert that poisons the process)."""
    for i, t in enumerate(prompt_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise TuneryError(
                f"Invalid token id {t!r} at position {i} of the prompt: this model's token ids are "
                f"integers from 0 to {vocab - 1}.",
                code="invalid_prompt",
                param=param,
            )


def request_key(
    model_spec: str | None, adapter_dir: str | None, resolved: dict[str, str]
) -> tuple[str, str | None]:
    """(base key, shared-adapter dir) of a request. Bases are keyed by their resolved directory, so an
    alias and its path share one loaded model (`resolved` caches the lookups); a full fine-tuned model
    dir becomes a base of its own, "base dir::model dir"."""
    if adapter_dir is not None:
        adapter_dir = str(model_dir(adapter_dir).resolve())
    spec = model_spec or (adapter_base(adapter_dir) if adapter_dir else None)
    if spec is None:
        raise ModelError("No model given, and the adapter does not name its base model.", param="model")
    if spec not in resolved:
        resolved[spec] = str(Path(resolve_model(spec).path).resolve())
    spec = resolved[spec]
    if adapter_dir is not None and not is_peft_adapter(adapter_dir):
        return f"{spec}::{adapter_dir}", None
    return spec, adapter_dir


def emit(req: _Request, seq: _Seq) -> None:
    """Hand a sequence's new text and logprobs (and its finish) to its request's handle."""
    if getattr(seq, "_closed", False):
        return
    delta, logprobs = seq.take_delta()
    if delta or logprobs or seq.done:
        req.emitted = True
        req.handle._push(StreamEvent(seq.index, delta, logprobs, seq.finish_reason))
    if seq.done:
        seq._closed = True  # type: ignore[attr-defined]


class Engine:
    """Thread-safe generation over several bases and adapters; see the module docstring."""

    def __init__(
        self,
        loader: Loader | None = None,
        *,
        max_adapters: int = 8,
        max_bases: int = 2,
        max_batch: int = 8,
        batch_wait: float = 0.005,
        autocast: bool | None = None,
        mixed_adapters: bool = True,
    ):
        self._loader: Loader = loader or (lambda spec, adapter: load_for_inference(spec, adapter))
        self.max_adapters = max(1, max_adapters)
        self.max_bases = max(1, max_bases)
        self.max_batch = max(1, max_batch)
        self.batch_wait = batch_wait
        self.autocast = autocast
        self.mixed_adapters = mixed_adapters
        self.stats: dict[str, float] = {}
        self._bases: OrderedDict[str, _Base] = OrderedDict()
        self._resolved: dict[str, str] = {}
        self._load_lock = threading.RLock()
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="tunery-engine", daemon=True)
        self._worker.start()

    # ----- public API -----
    def resolve(self, model_spec: str | None, adapter_dir: str | None) -> tuple[str, str | None]:
        """(base key, shared-adapter dir): full fine-tuned model dirs become bases of their own."""
        with self._load_lock:
            return request_key(model_spec, adapter_dir, self._resolved)

    def tokenizer(self, model_spec: str | None, adapter_dir: str | None = None) -> Any:
        """The tokenizer of the base a request would run on (loads the base if needed)."""
        key, _ = self.resolve(model_spec, adapter_dir)
        return self._base(key).tokenizer

    def model_config(self, model_spec: str | None, adapter_dir: str | None = None) -> Any:
        key, _ = self.resolve(model_spec, adapter_dir)
        return self._base(key).model.config

    def vocab_size(self, model_spec: str | None, adapter_dir: str | None = None) -> int:
        key, _ = self.resolve(model_spec, adapter_dir)
        return embedding_rows(self._base(key).model)

    def check(
        self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], params: GenerationParams
    ) -> GenerationParams:
        """Everything about one request that could fail a batch, checked alone: token ids in the
        vocabulary and the prompt within the context. Returns the params, max_new_tokens clipped."""
        key, _ = self.resolve(model_spec, adapter_dir)
        model = self._base(key).model  # load now, in the caller's thread, so errors surface right here
        check_token_ids(prompt_ids, embedding_rows(model))
        return _check_context(model, list(prompt_ids), params)

    def submit(
        self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], params: GenerationParams
    ) -> GenerationHandle:
        key, adapter = self.resolve(model_spec, adapter_dir)
        params = self.check(model_spec, adapter_dir, prompt_ids, params)
        handle = GenerationHandle(params.n)
        self._enqueue(_Request(key, adapter, list(prompt_ids), params, handle))
        return handle

    def _enqueue(self, req: _Request) -> None:
        """Hand a request to the worker thread."""
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._pending.append(req)
            self._cv.notify()

    def generate(
        self,
        model_spec: str | None,
        adapter_dir: str | None,
        prompt_ids: list[int],
        params: GenerationParams,
        timeout: float | None = None,
    ) -> list[GenerationResult]:
        return self.submit(model_spec, adapter_dir, prompt_ids, params).result(timeout)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)

    # ----- loading -----
    def _base(self, key: str) -> _Base:
        with self._load_lock:
            if key in self._bases:
                self._bases.move_to_end(key)
                return self._bases[key]
            spec, _, full_dir = key.partition("::")
            model, tok = self._loader(spec, full_dir or None)
            model = place(model.eval())  # the GPU when there is one; the KV cache is made beside it
            self._bases[key] = base = _Base(model, tok)
            while len(self._bases) > self.max_bases:
                self._bases.popitem(last=False)
            return base

    def _ensure_adapters(self, base: _Base, dirs: list[str]) -> Any:
        """Load the adapters a batch needs onto `base` (evicting least recently used ones); the model."""
        for path in dirs:
            name = adapter_name(path)
            if name in base.adapters:
                base.adapters.move_to_end(name)
                continue
            if not Path(path).is_dir():
                raise ModelError(f"Adapter directory not found: {path}", param="model")
            t0 = time.perf_counter()
            if base.peft is None:
                from peft import PeftModel

                with LOAD_LOCK, quiet_loading():
                    base.peft = PeftModel.from_pretrained(
                        base.model, path, adapter_name=name, is_trainable=False
                    )
                base.peft.eval()
            else:
                base.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self.stats["last_adapter_load_ms"] = (time.perf_counter() - t0) * 1000
            base.adapters[name] = path
            needed = {adapter_name(d) for d in dirs}
            while len(base.adapters) > max(self.max_adapters, len(dirs)):
                old = next(n for n in base.adapters if n not in needed)
                base.adapters.pop(old)
                base.peft.delete_adapter(old)
        return base.peft if base.peft is not None else base.model

    # ----- the worker -----
    def _take_batch(self) -> list[_Request]:
        first = self._pending[0]
        # peft's per-row `adapter_names=` only exists for plain LoRA; anything else batches per adapter.
        mixed_ok = self.mixed_adapters and _plain_lora(first.adapter)
        batch, size = [], 0
        for req in list(self._pending):
            if req.base_key != first.base_key or size >= self.max_batch:
                continue
            if req.adapter != first.adapter and not (mixed_ok and _plain_lora(req.adapter)):
                continue
            batch.append(req)
            size += req.params.n
            self._pending.remove(req)
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
            if self.batch_wait:
                time.sleep(self.batch_wait)  # let requests arriving together share the batch
            with self._cv:
                batch = self._take_batch()
            try:
                self._run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - delivered to the callers it belongs to
                self._isolate(batch, exc)

    def _isolate(self, batch: list[_Request], exc: BaseException) -> None:
        """A batch failed: decode each of its unfinished requests again alone, so only the request
        that causes the error gets it. One that already streamed part of its reply gets the error
        (starting over would repeat text its client has)."""
        pending = [r for r in batch if not r.handle._done.is_set()]
        for req in pending:
            if req.emitted or len(batch) == 1:
                req.handle._fail(exc)
                continue
            try:
                self._run_batch([req])
            except BaseException as own:  # noqa: BLE001 - this request's own error
                if not req.handle._done.is_set():
                    req.handle._fail(own)

    def _run_batch(self, batch: list[_Request]) -> None:
        base = self._base(batch[0].base_key)
        dirs = sorted({r.adapter for r in batch if r.adapter is not None})
        model = self._ensure_adapters(base, dirs) if dirs else (base.peft or base.model)
        mixed = len({r.adapter for r in batch}) > 1
        context: Any = nullcontext()
        if base.peft is not None and not mixed:
            if dirs:
                t0 = time.perf_counter()
                base.peft.set_adapter(adapter_name(dirs[0]))
                self.stats["last_switch_ms"] = (time.perf_counter() - t0) * 1000
            else:
                context = base.peft.disable_adapter()  # a base-model request on a wrapped base
        seqs: list[_Seq] = []
        for req in batch:
            name = adapter_name(req.adapter) if req.adapter else None
            req.seqs = [
                _Seq(req.prompt, req.params, base.tokenizer, index=i, adapter=name)
                for i in range(req.params.n)
            ]
            seqs.extend(req.seqs)
        owner = {id(s): req for req in batch for s in req.seqs}
        seqs.sort(key=lambda s: -len(s.prompt))
        # A prefix is prefilled once only for the n samples of one request: a batch mixes tenants'
        # requests, and a prefill shared between them would let one tenant's latency tell whether
        # another's prompt starts like theirs (the side channel vLLM's per-tenant cache salt closes).
        with context:
            for _active in decode_steps(
                model,
                base.tokenizer,
                seqs,
                autocast=self.autocast,
                mixed_adapters=mixed,
                share_prefix=len(batch) == 1,
            ):
                for seq in seqs:
                    req = owner[id(seq)]
                    if req.handle.cancelled and not seq.done:
                        seq.finish_reason = "stop"
                    emit(req, seq)
                for req in batch:
                    if not req.handle._done.is_set() and all(s.done for s in req.seqs):
                        req.handle._finish([s.result() for s in req.seqs])
