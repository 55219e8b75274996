"""The `vllm` serving engine: vLLM's continuous batching and multi-LoRA serving on a GPU.

The request translation (`sampling_kwargs`, `lora_request_args`, `logprob_entries`) is pure and
tested without vLLM (tests/test_serve_engines.py). The engine itself needs vLLM and a CUDA GPU, which
this project's CI machine has neither of: it has not run here (docs/serving.md says how to use it).

Semantics follow the other engines: `n` choices, seeds, stop strings cut from the text, OpenAI
logprobs entries made with the same tokenizer code, usage counted from token ids, `finish_reason`
"stop" or "length". One vLLM engine serves one base model; LoRA adapters of that base are served
together (`enable_lora`), each request naming its own.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from pathlib import Path
from typing import Any

from tunery.errors import ConfigError, ModelError
from tunery.generation.engine import GenerationHandle, StreamEvent, request_key
from tunery.generation.sequence import GenerationParams, GenerationResult, _token_entry, check_context


def sampling_kwargs(params: GenerationParams, vocab_logprobs: bool = False) -> dict[str, Any]:
    """vLLM `SamplingParams` keyword arguments for one request (temperature 0 is greedy in both)."""
    kwargs: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "seed": params.seed,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    if params.logprobs:
        # vLLM returns the sampled token's logprob plus this many alternatives.
        kwargs["logprobs"] = params.top_logprobs
    return kwargs


def lora_request_args(adapter_dir: str) -> tuple[str, int, str]:
    """(name, positive integer id, path) for vLLM's `LoRARequest`: stable for a directory, so the
    same adapter keeps its slot in vLLM's adapter cache across requests."""
    path = str(Path(adapter_dir).resolve())
    digest = hashlib.sha1(path.encode()).hexdigest()
    return "a" + digest[:16], int(digest[:7], 16) + 1, path


def logprob_entries(
    tokenizer: Any, token_ids: list[int], steps: list[dict[int, Any]] | None, top: int
) -> list[dict[str, Any]] | None:
    """OpenAI `logprobs.content` entries from vLLM's per-step {token id: Logprob} dicts."""
    if steps is None:
        return None
    out = []
    for token_id, step in zip(token_ids, steps, strict=False):
        entry = _token_entry(tokenizer, token_id, float(step[token_id].logprob))
        ranked = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:top]
        entry["top_logprobs"] = [_token_entry(tokenizer, t, float(lp.logprob)) for t, lp in ranked]
        out.append(entry)
    return out


def _result(output: Any, prompt_tokens: int, tokenizer: Any, params: GenerationParams) -> GenerationResult:
    ids = list(output.token_ids)
    return GenerationResult(
        token_ids=[t for t in ids if t != tokenizer.eos_token_id],
        text=output.text,
        finish_reason="length" if output.finish_reason == "length" else "stop",
        logprobs=logprob_entries(tokenizer, ids, output.logprobs, params.top_logprobs)
        if params.logprobs
        else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(ids),
        index=output.index,
    )


class VllmEngine:
    """vLLM's `LLMEngine` stepped by one worker thread, with the torch `Engine`'s public API."""

    name = "vllm"

    @staticmethod
    def check_available() -> None:
        try:
            import torch
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"--engine vllm needs vLLM ({exc}).",
                hint="pip install vllm on a GPU machine.",
                param="engine",
            ) from exc
        if not torch.cuda.is_available():
            raise ConfigError("--engine vllm needs a CUDA GPU; none is visible.", param="engine")

    def __init__(self, *, max_loras: int = 8, max_lora_rank: int = 64):
        self.check_available()
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self._resolved: dict[str, str] = {}
        self._engine: Any = None
        self._key: str | None = None
        self._tokenizer: Any = None
        self._handles: dict[str, tuple[GenerationHandle, GenerationParams, int, dict[int, str]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="tunery-vllm", daemon=True)
        self._worker.start()

    def _load(self, model_spec: str | None, adapter_dir: str | None) -> tuple[str | None, Any]:
        key, adapter = request_key(model_spec, adapter_dir, self._resolved)
        with self._lock:
            if self._engine is None:
                from vllm import EngineArgs, LLMEngine

                path = key.partition("::")[2] or key
                args = EngineArgs(
                    model=path, enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank
                )
                self._engine, self._key = LLMEngine.from_engine_args(args), key
                self._tokenizer = self._engine.get_tokenizer()
            elif key != self._key:
                raise ModelError("The vllm engine serves one base model per server.", param="model")
        return adapter, self._engine

    def tokenizer(self, model_spec: str | None, adapter_dir: str | None = None) -> Any:
        self._load(model_spec, adapter_dir)
        return self._tokenizer

    def vocab_size(self, model_spec: str | None, adapter_dir: str | None = None) -> int:
        _, engine = self._load(model_spec, adapter_dir)
        return int(engine.model_config.get_vocab_size())

    def check(self, model_spec, adapter_dir, prompt_ids, params):  # noqa: ANN001
        _, engine = self._load(model_spec, adapter_dir)
        return check_context(engine.model_config.max_model_len, list(prompt_ids), params)

    def submit(self, model_spec, adapter_dir, prompt_ids, params):  # noqa: ANN001
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = self.check(model_spec, adapter_dir, prompt_ids, params)
        adapter, engine = self._load(model_spec, adapter_dir)
        lora = LoRARequest(*lora_request_args(adapter)) if adapter else None
        handle = GenerationHandle(params.n)
        rid = f"r{next(self._ids)}"
        with self._lock:
            self._handles[rid] = (handle, params, len(prompt_ids), {})
            engine.add_request(
                rid,
                {"prompt_token_ids": list(prompt_ids)},
                SamplingParams(**sampling_kwargs(params)),
                lora_request=lora,
            )
            self._lock.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._handles and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                outputs = self._engine.step()
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: Any) -> None:
        handle, params, n_prompt, sent = self._handles[out.request_id]
        for choice in out.outputs:
            text = choice.text
            delta = text[len(sent.get(choice.index, "")) :]
            sent[choice.index] = text
            done = choice.finish_reason is not None
            if delta or done:
                reason = ("length" if choice.finish_reason == "length" else "stop") if done else None
                handle._push(StreamEvent(choice.index, delta, [], reason))
        if out.finished:
            self._handles.pop(out.request_id, None)
            handle._finish([_result(c, n_prompt, self._tokenizer, params) for c in out.outputs])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._worker.join(timeout=30)
