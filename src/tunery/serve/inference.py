"""`/v1/chat/completions` and `/v1/completions` on the shared generation `Engine`.

Base aliases, fine-tuned models and their checkpoints all resolve to (base spec, adapter dir); the
engine keeps one loaded base per model and an LRU of adapters on it, and batches concurrent requests
(several LoRA adapters in one batch). Blocking engine calls run in the threadpool so the event
loop keeps serving while a batch decodes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunery.errors import TuneryError
from tunery.generation.generate import chat_prompt
from tunery.generation.sequence import GenerationParams
from tunery.redact import scrub_paths
from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.echo import (
    check_echo,
    completion_choice,
    completion_chunks,
    echo_options,
    echo_texts,
    scores_of,
    submit_scores,
)
from tunery.serve.engines import serving_engine
from tunery.serve.resolver import resolve_model_name
from tunery.serve.stored import capture_for, tee_stream

router = APIRouter(prefix="/v1")
DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 128  # prompts x n of one request: each is a sequence in the shared batches
_SENTINEL = object()


def _number(body: dict[str, Any], key: str, default: Any, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise ApiError(
            400,
            f"Invalid type for '{key}': expected {'an integer' if kind is int else 'a number'}.",
            param=key,
        )
    return kind(value)


def _params(body: dict[str, Any], chat: bool):
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, int)
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ApiError(
            400,
            "Invalid type for 'max_completion_tokens': expected an integer.",
            param="max_completion_tokens",
        )
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ApiError(400, "Invalid type for 'stop': expected a string or a list of strings.", param="stop")
    if chat:
        logprobs = bool(body.get("logprobs") or False)
        top = _number(body, "top_logprobs", 0, int)
        if top and not logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    else:  # the legacy API: logprobs is the number of top alternatives
        top = _number(body, "logprobs", None, int)
        logprobs = top is not None
        top = top or 0
    return GenerationParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        stop=cast(list[str], stop or []),
        seed=_number(body, "seed", None, int),
        logprobs=logprobs,
        top_logprobs=top,
        n=_number(body, "n", 1, int),
    )


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # content parts: only text parts can be rendered by a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise ApiError(400, f"{where}: only text content parts are supported.", param=where)
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts.", param=where)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
            "function",
        ):
            raise ApiError(400, f"Invalid value for 'messages[{i}].role'.", param=f"messages[{i}].role")
        msg = {k: v for k, v in m.items() if k in ("role", "name", "tool_calls", "tool_call_id")}
        msg["role"] = "system" if m["role"] == "developer" else m["role"]
        msg["content"] = _text_of(m.get("content"), f"messages[{i}].content")
        out.append(msg)
    return out


async def _prepare(
    request: Request, who: Principal, body: dict[str, Any], engine: Any
) -> tuple[Any, str, str | None, str]:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    spec, rel = resolve_model_name(request, who, name)
    adapter = str(request.app.state.store.path(rel)) if rel else None
    tokenizer = await run_in_threadpool(engine.tokenizer, spec, adapter)
    return engine, spec, adapter, tokenizer


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    body: dict[str, Any] = Body(...),
    who: Principal = Depends(principal),
    served_by: Any = Depends(serving_engine),
) -> dict[str, Any] | StreamingResponse:
    messages = _messages(body)
    params = _params(body, chat=True)
    capture = capture_for(request, who, body)  # checks `store` and `metadata` before any work
    engine, spec, adapter, tokenizer = await _prepare(request, who, body, served_by)
    prompt = await run_in_threadpool(chat_prompt, tokenizer, messages, body.get("tools"))
    await _check_logit_bias(body, engine, spec, adapter)
    handle = await run_in_threadpool(engine.submit, spec, adapter, prompt, params)
    cid, created, model = "chatcmpl-" + secrets.token_hex(12), int(time.time()), body["model"]
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _chat_chunks(handle, cid, created, model, len(prompt), params.n, include_usage)
        if capture is not None:

            def store(choices: list[dict[str, Any]], counted: dict[str, int] | None) -> None:
                # Without include_usage no chunk counted the tokens; the finished handle has them.
                tokens = sum(r.completion_tokens for r in handle.result())
                capture.save(
                    _chat_response(cid, created, model, choices, counted or _usage(len(prompt), tokens))
                )

            chunks = tee_stream(chunks, store)
        return _sse(chunks, handle)
    results = await run_in_threadpool(handle.result)
    choices = [
        {
            "index": r.index,
            "message": {"role": "assistant", "content": r.text, "refusal": None},
            "logprobs": {"content": r.logprobs, "refusal": None} if r.logprobs is not None else None,
            "finish_reason": r.finish_reason,
        }
        for r in results
    ]
    usage = _usage(len(prompt), sum(r.completion_tokens for r in results))
    response = _chat_response(cid, created, model, choices, usage)
    if capture is not None:
        await run_in_threadpool(capture.save, response)
    return response


def _chat_response(
    cid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
        "service_tier": None,
    }


def _chat_chunks(
    handle: Any, cid: str, created: int, model: str, prompt_tokens: int, n: int, include_usage: bool
) -> Iterator[dict[str, Any]]:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    for i in range(n):  # the first delta of every choice carries the role
        yield {
            **base,
            "choices": [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
    for ev in handle.events():
        if not ev.text and not ev.logprobs and ev.finish_reason is None:
            continue
        delta = {"content": ev.text} if ev.text else {}
        yield {
            **base,
            "choices": [
                {
                    "index": ev.index,
                    "delta": delta,
                    "logprobs": {"content": ev.logprobs, "refusal": None} if ev.logprobs else None,
                    "finish_reason": ev.finish_reason,
                }
            ],
            "usage": None,
        }
    if include_usage:
        results = handle.result()
        yield {
            **base,
            "choices": [],
            "usage": _usage(prompt_tokens, sum(r.completion_tokens for r in results)),
        }


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _prompts(body: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return [list(prompt)]  # one prompt given as token ids
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(list(tokenizer(p, add_special_tokens=True)["input_ids"]))
        elif isinstance(p, list) and all(_is_token(t) for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, "prompt must be a string, a list of strings or token ids.", param="prompt")
    return out


async def _check_logit_bias(body: dict[str, Any], engine: Any, spec: str, adapter: str | None) -> None:
    """`logit_bias` is checked like a prompt (keys are token ids of this model, values in
    [-100, 100]) and then refused: generation does not apply it, and ignoring it would be a lie."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must be an object of token ids to numbers.", param="logit_bias")
    vocab = await run_in_threadpool(engine.vocab_size, spec, adapter)
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise ApiError(
                400,
                f"Invalid logit_bias key {key!r}: expected a token id from 0 to {vocab - 1}.",
                param="logit_bias",
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise ApiError(
                400,
                f"Invalid logit_bias value for {key}: expected a number in [-100, 100].",
                param="logit_bias",
            )
    if bias:
        raise ApiError(
            400,
            "logit_bias is not supported by this server.",
            param="logit_bias",
            code="unsupported_parameter",
        )


@router.post("/completions", response_model=None)
async def completions(
    request: Request,
    body: dict[str, Any] = Body(...),
    who: Principal = Depends(principal),
    served_by: Any = Depends(serving_engine),
) -> dict[str, Any] | StreamingResponse:
    echo, prompt_only, gen_body = echo_options(body)  # echo + max_tokens 0: score the prompt alone
    params = _params(gen_body, chat=False)
    engine, spec, adapter, tokenizer = await _prepare(request, who, body, served_by)
    prompts = _prompts(body, tokenizer)
    if len(prompts) * params.n > MAX_CHOICES:
        raise ApiError(400, f"At most {MAX_CHOICES} choices per request (prompts times n).", param="prompt")
    await _check_logit_bias(body, engine, spec, adapter)
    if echo:
        check_echo(prompts, params)
    # Echo with logprobs goes to the torch engine, which scores the prompt and decodes the completion.
    routed = {"echo": True} if echo and params.logprobs else {}
    # Every prompt is checked before any is queued: a bad one fails this request alone, early.
    for p in prompts:
        await run_in_threadpool(engine.check, spec, adapter, p, params, **routed)
    scores = await submit_scores(engine, spec, adapter, prompts, params) if echo else [None] * len(prompts)
    prefixes = echo_texts(body, prompts, tokenizer) if echo else [""] * len(prompts)
    handles = []
    for p in [] if prompt_only else prompts:
        handles.append(await run_in_threadpool(engine.submit, spec, adapter, p, params, **routed))
    cid, created, model = "cmpl-" + secrets.token_hex(12), int(time.time()), body["model"]
    n_prompt = sum(len(p) for p in prompts)
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        echoed = list(zip(prefixes, scores, strict=True)) if echo else None
        chunks = completion_chunks(handles, params, cid, created, model, n_prompt, usage, echoed)
        return _sse(chunks, *handles)
    choices, completion_tokens = [], 0
    for k in range(len(prompts)):
        prompt_lp = await run_in_threadpool(scores_of, scores[k])
        results = await run_in_threadpool(handles[k].result) if handles else [None] * params.n
        for i, r in enumerate(results):
            completion_tokens += r.completion_tokens if r else 0
            index = k * params.n + (r.index if r else i)
            choices.append(completion_choice(index, r, prefixes[k], prompt_lp, params.logprobs))
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(n_prompt, completion_tokens),
        "system_fingerprint": None,
    }


def _sse(chunks: Iterator[dict[str, Any]], *handles: Any) -> StreamingResponse:
    """Server-sent events from a blocking chunk iterator, pulled in the threadpool. An error after
    the response has started is sent as an `error` chunk (the SDK raises it); a client that goes
    away cancels its generation."""

    async def gen() -> AsyncIterator[str]:
        try:
            while True:
                try:
                    chunk = await run_in_threadpool(next, chunks, _SENTINEL)
                except TuneryError as exc:
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "error": {
                                    "message": scrub_paths(exc.message),
                                    "type": "invalid_request_error",
                                    "param": exc.param,
                                    "code": exc.code,
                                }
                            }
                        )
                        + "\n\n"
                    )
                    break
                except Exception as exc:  # a bug mid-stream: the client still gets a well-formed error
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "error": {
                                    "message": scrub_paths(f"Generation failed: {exc}"),
                                    "type": "server_error",
                                    "param": None,
                                    "code": None,
                                }
                            }
                        )
                        + "\n\n"
                    )
                    break
                if chunk is _SENTINEL:
                    break
                yield "data: " + json.dumps(chunk) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                h.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
