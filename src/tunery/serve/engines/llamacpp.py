"""The `llamacpp` serving engine: llama.cpp computes the forward passes, Tunery's decode loop the rest.

Each base model is loaded from its GGUF form (`gguf_forms.py`) into one llama.cpp context with a KV
slot per sequence. Sequences join and leave between steps (continuous batching): a request that
arrives while others decode is prefilled at the next step instead of waiting for a batch to finish,
and one llama.cpp batch carries every running sequence of a base and adapter. LoRA adapters are
GGUF LoRA files set on the context for the sequences that use them, so adapters share a base.

Everything after the logits is the torch engine's own code (`generation/generate.py`): the sampler with
its per-request seeded generator, stop strings, incremental detokenization, logprobs and finish
reasons. Prompts arrive as token ids from the same Hugging Face tokenizer. So the engines differ only
in the arithmetic of the forward pass, and greedy replies agree token for token on an f32 GGUF
(tests/test_serve_engines.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import ModelError, TuneryError
from tunery.generation.engine import GenerationHandle, _Request, check_token_ids, emit, request_key
from tunery.generation.sequence import GenerationParams, _entries, _pick_tokens, _Seq, check_context
from tunery.methods.loading import read_info, saved_tokenizer
from tunery.serve.engines.gguf_forms import BaseForm, ensure_adapter, ensure_base, forms_dir, prune
from tunery.serve.engines.llamacpp_probe import extra_buffers_safe

DEFAULT_CTX_PER_SEQ = 4096  # KV cells per sequence; longer requests go to the torch engine
_LOG_SINK: Any = None


def available() -> str | None:
    """None when llama-cpp-python imports; otherwise why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        return f"llama-cpp-python is not usable here ({type(exc).__name__}: {exc})"
    return None


def _lib() -> Any:
    global _LOG_SINK
    import llama_cpp

    if _LOG_SINK is None:  # llama.cpp logs every load to stderr; the server has its own log
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, None)
        llama_cpp.llama_backend_init()
    return llama_cpp


class _Native:
    """One base GGUF in llama.cpp: the model, a context with `slots` KV sequences, its adapters."""

    def __init__(
        self, form: BaseForm, tokenizer: Any, *, slots: int, ctx_per_seq: int, threads: int, gguf_type: str
    ):
        lib = _lib()
        self.lib, self.form, self.tokenizer = lib, form, tokenizer
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # the AMX/repacked buffers only where a child process survived them (llamacpp_probe.py)
        mparams.use_extra_bufts = extra_buffers_safe(form.gguf, gguf_type, forms_dir())
        self.model = lib.llama_model_load_from_file(str(form.gguf).encode(), mparams)
        if not self.model:
            raise ModelError("llama.cpp could not load the model's GGUF form.", param="model")
        per_seq = min(ctx_per_seq, form.context or ctx_per_seq)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = per_seq * slots
        cparams.n_seq_max = slots
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads
        # One KV buffer for all sequences: llama.cpp then batches their steps into one matmul per layer
        # (with a buffer per sequence it computed them one by one: 8 at once ran no faster than 1).
        # No sequence can starve another: each is admitted only within its `per_seq` share.
        cparams.kv_unified = True
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ModelError("llama.cpp could not make a context for the model.", param="model")
        self.n_batch = 512
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.context = min(per_seq, lib.llama_n_ctx(self.ctx) // slots)
        self.free = list(range(slots))
        self.adapters: OrderedDict[str, Any] = OrderedDict()  # adapter dir -> llama_adapter_lora
        self.files: dict[str | None, str] = {None: str(form.gguf)}  # the GGUFs loaded: base, adapter dirs
        self.current: str | None = None  # the adapter set on the context

    def use(self, adapter: str | None) -> None:
        if adapter == self.current:
            return
        lib = self.lib
        if adapter is None:
            lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            ptrs = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            lib.llama_set_adapters_lora(self.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
        self.current = adapter

    def load_adapter(self, directory: str, gguf: str, keep: int, busy: set[str]) -> None:
        if directory in self.adapters:
            self.adapters.move_to_end(directory)
            return
        ptr = self.lib.llama_adapter_lora_init(self.model, gguf.encode())
        if not ptr:
            raise ModelError("llama.cpp could not load the adapter's GGUF LoRA form.", param="model")
        self.adapters[directory], self.files[directory] = ptr, gguf
        idle = [d for d in self.adapters if d not in busy and d != directory]
        for old in idle[: max(0, len(self.adapters) - keep)]:
            if self.current == old:
                self.use(None)
            self.lib.llama_adapter_lora_free(self.adapters.pop(old))
            self.files.pop(old, None)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, slot, want logits) entries (at most n_batch)."""
        b = self.batch
        for i, (token, pos, slot, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(logits)
            b.seq_id[i][0] = slot
        b.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, b)
        if status != 0:
            raise TuneryError(f"llama.cpp failed to decode a batch (status {status}).", code="server_error")

    def logits(self, i: int) -> Any:
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def release(self, slot: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.free.append(slot)

    def close(self) -> None:
        lib = self.lib
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        for ptr in self.adapters.values():
            lib.llama_adapter_lora_free(ptr)
        lib.llama_model_free(self.model)


@dataclass
class _Live:
    req: _Request
    seq: _Seq
    key: str
    slot: int = -1
    fed: int = 0  # prompt and reply tokens already in the KV cache


@dataclass
class _Group:
    native: _Native
    adapter: str | None
    lives: list[_Live] = field(default_factory=list)


class LlamaCppEngine:
    """Thread-safe generation on llama.cpp, with the torch `Engine`'s public API (see the docstring)."""

    name = "llamacpp"

    def __init__(
        self,
        *,
        gguf_type: str = "f32",
        max_batch: int = 8,
        max_bases: int = 2,
        max_adapters: int = 8,
        ctx_per_seq: int = DEFAULT_CTX_PER_SEQ,
        threads: int | None = None,
        cache_mb: int = 0,
    ):
        why = available()
        if why is not None:
            raise ModelError(why, hint="pip install llama-cpp-python, or serve with --engine torch.")
        self.gguf_type = gguf_type
        self.slots = max(1, max_batch)
        self.max_bases, self.max_adapters = max(1, max_bases), max(1, max_adapters)
        self.ctx_per_seq, self.cache_mb = ctx_per_seq, cache_mb  # cache_mb: gguf_forms.prune's limit
        self.threads = threads or len(os.sched_getaffinity(0))
        self._bases: OrderedDict[str, _Native] = OrderedDict()
        self._resolved: dict[str, str] = {}
        self._adapter_forms: dict[tuple, str] = {}  # (base key, adapter, weights size, mtime) -> GGUF
        self._load_lock = threading.RLock()
        self._cv = threading.Condition()
        self._waiting: deque[_Live] = deque()
        self._live: list[_Live] = []
        self._closed = False
        self.stats = {"decode_calls": 0, "largest_step": 0}  # sequences in one decode step, at most
        self._worker = threading.Thread(target=self._run, name="tunery-llamacpp", daemon=True)
        self._worker.start()

    # ----- the torch Engine's public API -----
    def resolve(self, model_spec: str | None, adapter_dir: str | None) -> tuple[str, str | None]:
        with self._load_lock:
            return request_key(model_spec, adapter_dir, self._resolved)

    def tokenizer(self, model_spec: str | None, adapter_dir: str | None = None) -> Any:
        return self._base(self.resolve(model_spec, adapter_dir)[0]).tokenizer

    def vocab_size(self, model_spec: str | None, adapter_dir: str | None = None) -> int:
        return self._base(self.resolve(model_spec, adapter_dir)[0]).n_vocab

    def context(self, model_spec: str | None, adapter_dir: str | None = None) -> int:
        """The longest prompt plus reply this engine decodes for the model."""
        return self._base(self.resolve(model_spec, adapter_dir)[0]).context

    def prepare(self, model_spec: str | None, adapter_dir: str | None) -> None:
        """Write the GGUF forms a model needs (base, adapter) without loading them."""
        key, adapter = self.resolve(model_spec, adapter_dir)
        with self._load_lock:
            self._prune(ensure_base(key, self.gguf_type).gguf)
        if adapter is not None:
            self._adapter_form(key, adapter)

    def check(
        self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], params: GenerationParams
    ) -> GenerationParams:
        key, adapter = self.resolve(model_spec, adapter_dir)
        native = self._base(key)
        if adapter is not None:
            self._adapter_form(key, adapter)  # convert now, so a bad adapter fails this request here
        check_token_ids(prompt_ids, native.n_vocab)
        return check_context(native.context, list(prompt_ids), params)

    def submit(
        self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], params: GenerationParams
    ) -> GenerationHandle:
        key, adapter = self.resolve(model_spec, adapter_dir)
        params = self.check(model_spec, adapter_dir, prompt_ids, params)
        native = self._base(key)
        req = _Request(key, adapter, list(prompt_ids), params, GenerationHandle(params.n))
        req.seqs = [_Seq(req.prompt, params, native.tokenizer, index=i) for i in range(params.n)]
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._waiting.extend(_Live(req, seq, key) for seq in req.seqs)
            self._cv.notify()
        return req.handle

    def generate(self, model_spec, adapter_dir, prompt_ids, params, timeout=None):  # noqa: ANN001
        return self.submit(model_spec, adapter_dir, prompt_ids, params).result(timeout)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)
        with self._load_lock:
            for native in self._bases.values():
                native.close()
            self._bases.clear()

    # ----- loading -----
    def _base(self, key: str) -> _Native:
        with self._load_lock:
            if key in self._bases:
                self._bases.move_to_end(key)
            else:
                spec, _, full_dir = key.partition("::")
                form = ensure_base(key, self.gguf_type)
                tokenizer = saved_tokenizer(read_info(full_dir) if full_dir else None, spec)
                self._bases[key] = _Native(
                    form,
                    tokenizer,
                    slots=self.slots,
                    ctx_per_seq=self.ctx_per_seq,
                    threads=self.threads,
                    gguf_type=self.gguf_type,
                )
            self._drop_idle(keep=key)
            self._prune()
            return self._bases[key]

    def _drop_idle(self, keep: str) -> None:
        """Close bases beyond `max_bases`, least recently used first, among those with no sequence
        decoding or waiting: a busy base stays, so for a while there can be more than max_bases. The
        worker admits sequences under the condition lock, so none is given a slot of a closing base."""
        with self._cv:
            waiting = {w.key for w in self._waiting}
            idle = [
                k
                for k, n in self._bases.items()
                if k != keep and len(n.free) == self.slots and k not in waiting
            ]
            for old in idle[: max(0, len(self._bases) - self.max_bases)]:
                self._bases.pop(old).close()

    def _adapter_form(self, key: str, adapter: str) -> str:
        """The adapter's GGUF LoRA path. Finding it hashes the adapter's weights, so it is found once
        per version of the weights file (its size and time), not on every request and decode step."""
        from transformers import AutoConfig

        st = (Path(adapter) / "adapter_model.safetensors").stat()
        version = (key, adapter, st.st_size, st.st_mtime_ns)
        with self._load_lock:
            known = self._adapter_forms.get(version)
            if known is None or not Path(known).is_file():  # new, or pruned since (by any process)
                config = AutoConfig.from_pretrained(key.partition("::")[0], trust_remote_code=False)
                self._adapter_forms[version] = known = str(ensure_adapter(key, adapter, config))
                self._prune(Path(known))
            return known

    def _prune(self, *also: Path) -> None:
        """Hold the GGUF forms to `cache_mb`, but those loaded here and `also` (about to be loaded)."""
        if self.cache_mb > 0:
            loaded = [Path(f) for n in self._bases.values() for f in n.files.values()]
            prune(self.cache_mb, [*also, *loaded])

    # ----- the worker -----
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._live and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for live in [*self._waiting, *self._live]:
                        if not live.req.handle._done.is_set():
                            live.req.handle._fail(RuntimeError("engine is closed"))
                    return
                admitted = self._admit()
                # A base dropped while its requests waited is loaded again, outside the condition lock
                # (`_base` takes the load lock, then this one: never the other way round).
                orphan = self._waiting[0] if not self._live and self._waiting else None
            if orphan is not None:
                try:
                    self._base(orphan.key)
                except BaseException as exc:  # noqa: BLE001 - that request's error
                    self._fail([orphan], exc)
            for group in self._groups(admitted):
                self._guarded(group, self._prefill)
            for group in self._groups([lv for lv in self._live if lv.fed and not lv.seq.done]):
                self._guarded(group, self._step)

    def _admit(self) -> list[_Live]:
        """Waiting sequences that get a free KV slot of their base now, in arrival order."""
        admitted: list[_Live] = []
        kept: deque[_Live] = deque()
        while self._waiting:
            live = self._waiting.popleft()
            native = self._bases.get(live.key)
            if native is None or not native.free:
                kept.append(live)
                continue
            live.slot = native.free.pop()
            admitted.append(live)
            self._live.append(live)
        self._waiting = kept
        return admitted

    def _groups(self, lives: list[_Live]) -> list[_Group]:
        groups: dict[tuple[str, str | None], _Group] = {}
        for live in lives:
            k = (live.key, live.req.adapter)
            if k not in groups:
                groups[k] = _Group(self._bases[live.key], live.req.adapter)
            groups[k].lives.append(live)
        return list(groups.values())

    def _guarded(self, group: _Group, work: Any) -> None:
        try:
            if group.adapter is not None:
                busy = {lv.req.adapter for lv in self._live if lv.req.adapter}
                with self._load_lock:  # no `_prune` between finding the form and loading it
                    gguf = self._adapter_form(group.lives[0].key, group.adapter)
                    group.native.load_adapter(group.adapter, gguf, self.max_adapters, busy)
            group.native.use(group.adapter)
            work(group)
        except BaseException as exc:  # noqa: BLE001 - delivered to the requests of this group
            self._fail(group.lives, exc)

    def _prefill(self, group: _Group) -> None:
        entries, owners = [], []
        for live in group.lives:
            n = len(live.seq.prompt)
            entries += [(t, p, live.slot, p == n - 1) for p, t in enumerate(live.seq.prompt)]
            owners += [live if p == n - 1 else None for p in range(n)]
            live.fed = n
        ready: list[tuple[_Live, Any]] = []
        for start in range(0, len(entries), group.native.n_batch):
            chunk = entries[start : start + group.native.n_batch]
            group.native.decode(chunk)
            for i, owner in enumerate(owners[start : start + len(chunk)]):
                if owner is not None:
                    ready.append((owner, group.native.logits(i)))
        self._accept(group, [lv for lv, _ in ready], [row for _, row in ready])

    def _step(self, group: _Group) -> None:
        for live in group.lives:
            if live.req.handle.cancelled:
                live.seq.finish_reason = "stop"
        lives = [lv for lv in group.lives if not lv.seq.done]
        if lives:
            group.native.decode([(lv.seq.generated[-1], lv.fed, lv.slot, True) for lv in lives])
            self.stats["decode_calls"] += 1
            self.stats["largest_step"] = max(self.stats["largest_step"], len(lives))
            for lv in lives:
                lv.fed += 1
        self._accept(group, lives, [group.native.logits(i) for i in range(len(lives))])

    def _accept(self, group: _Group, lives: list[_Live], rows: list[Any]) -> None:
        """Sample each sequence's next token from its logits row with the torch engine's sampler."""
        import numpy as np
        import torch

        if lives:
            logits = torch.from_numpy(np.stack(rows))
            seqs = [lv.seq for lv in lives]
            want = any(s.params.logprobs for s in seqs)
            logp = torch.log_softmax(logits, dim=-1) if want else None
            eos = group.native.form.eos_ids
            for row, (seq, tok) in enumerate(zip(seqs, _pick_tokens(logits, seqs), strict=True)):
                seq.accept(tok, eos, _entries(logp, row, tok, seq, group.native.tokenizer))
        for live in group.lives:
            emit(live.req, live.seq)
            if live.seq.done:
                self._retire(live)

    def _retire(self, live: _Live) -> None:
        if live in self._live:
            self._live.remove(live)
            self._bases[live.key].release(live.slot)
        req = live.req
        if not req.handle._done.is_set() and all(s.done for s in req.seqs):
            req.handle._finish([s.result() for s in req.seqs])

    def _fail(self, lives: list[_Live], exc: BaseException) -> None:
        for live in lives:
            if live in self._live:
                self._live.remove(live)
                self._bases[live.key].release(live.slot)
            with self._cv:  # the request's other choices stop too
                self._waiting = deque(w for w in self._waiting if w.req is not live.req)
            for other in [w for w in self._live if w.req is live.req]:
                self._live.remove(other)
                self._bases[other.key].release(other.slot)
            if not live.req.handle._done.is_set():
                live.req.handle._fail(exc)
