"""`echo` and `logprobs` on the legacy `/v1/completions`, as OpenAI defined them.

- `echo: true` returns the prompt before the completion, in `text`.
- `logprobs: k` (0-5 with echo) returns `{tokens, token_logprobs, top_logprobs, text_offset}`; with
  echo it covers the prompt's tokens too: the first prompt token has `null` logprob and top logprobs
  (nothing comes before it), the others the log-probability the model gives them after the tokens
  before. `text_offset` counts characters of the returned `text`.
- `max_tokens: 0` with echo generates nothing: the prompt alone is scored (`finish_reason: "length"`).

This is what `lm-eval`'s `local-completions` sends to score log-likelihood tasks. The prompt scores
come from the torch engine (`serve/engines/scoring.py`), which also decodes the completion of an
echo request, so both come from one model. Bounds: a prompt is within the model's context like any
prompt; one request scores at most `MAX_ECHO_TOKENS` prompt tokens, each with at most
`MAX_ECHO_LOGPROBS` alternatives, so the response it builds stays small.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.concurrency import run_in_threadpool

from tunery.serve.common import ApiError

MAX_ECHO_TOKENS = 32768
MAX_ECHO_LOGPROBS = 5


def echo_options(body: dict[str, Any]) -> tuple[bool, bool, dict[str, Any]]:
    """(echo, prompt only (`max_tokens: 0`), the body the generation params are read from)."""
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, "Invalid type for 'echo': expected a boolean.", param="echo")
    max_tokens = body.get("max_tokens")
    if echo and max_tokens == 0 and isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        return True, True, {**body, "max_tokens": 1}
    return bool(echo), False, body


def check_echo(prompts: list[list[int]], params: Any) -> None:
    """The bounds of scoring prompts: alternatives per token, prompt tokens per request."""
    if not params.logprobs:
        return
    if params.top_logprobs > MAX_ECHO_LOGPROBS:
        raise ApiError(
            400,
            f"Invalid value for 'logprobs': at most {MAX_ECHO_LOGPROBS} with echo.",
            param="logprobs",
        )
    total = sum(len(p) for p in prompts)
    if total > MAX_ECHO_TOKENS:
        raise ApiError(
            400,
            f"echo with logprobs scores at most {MAX_ECHO_TOKENS} prompt tokens per request; this one has "
            f"{total}. Send the prompts in several requests.",
            param="prompt",
        )


def echo_texts(body: dict[str, Any], prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """The text each prompt echoes: the string as sent, or the decoded token ids."""
    raw = body.get("prompt")
    one = isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(t, int) for t in raw))
    items = [raw] if one else raw
    if not isinstance(items, list) or len(items) != len(prompts):
        items = [None] * len(prompts)
    return [
        item if isinstance(item, str) else tokenizer.decode(ids, skip_special_tokens=False)
        for item, ids in zip(items, prompts, strict=True)
    ]


async def submit_scores(
    engine: Any, spec: str, adapter: str | None, prompts: list[list[int]], params: Any
) -> list[Any]:
    """A scoring handle per prompt (None where no logprobs were asked for: echo of text alone)."""
    if not params.logprobs:
        return [None] * len(prompts)
    return [await run_in_threadpool(engine.score, spec, adapter, p, params.top_logprobs) for p in prompts]


def scores_of(handle: Any) -> list[dict[str, Any]] | None:
    """The prompt entries of a scoring handle (blocks until scored)."""
    return None if handle is None else handle.result()[0].entries


def legacy_logprobs(
    entries: list[dict[str, Any]] | None,
    prompt_entries: list[dict[str, Any]] | None = None,
    completion_start: int = 0,
) -> dict[str, Any] | None:
    """OpenAI's legacy `logprobs` object for the (echoed prompt and) completion tokens."""
    if entries is None and prompt_entries is None:
        return None
    offsets, pos = [], 0
    for e in prompt_entries or []:
        offsets.append(pos)
        pos += len(e["token"])
    pos = completion_start if prompt_entries is not None else 0
    for e in entries or []:
        offsets.append(pos)
        pos += len(e["token"])
    every = [*(prompt_entries or []), *(entries or [])]
    return {
        "tokens": [e["token"] for e in every],
        "token_logprobs": [e["logprob"] for e in every],
        "top_logprobs": [
            None if e.get("top_logprobs") is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in every
        ],
        "text_offset": offsets,
    }


def completion_choice(
    index: int, result: Any, prefix: str, prompt_entries: list[dict[str, Any]] | None, logprobs: bool
) -> dict[str, Any]:
    """One `text_completion` choice: the echoed prefix (may be empty) plus the result, if any."""
    if result is None:  # max_tokens 0: the prompt alone
        lp = legacy_logprobs([], prompt_entries, len(prefix)) if logprobs else None
        return {"text": prefix, "index": index, "logprobs": lp, "finish_reason": "length"}
    return {
        "text": prefix + result.text,
        "index": index,
        "logprobs": legacy_logprobs(result.logprobs, prompt_entries, len(prefix)),
        "finish_reason": result.finish_reason,
    }


def completion_chunks(
    handles: list[Any],
    params: Any,
    cid: str,
    created: int,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    echoed: list[tuple[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Chunks of every prompt's choices in turn; with echo each choice starts with its prompt (and
    the prompt's logprobs); with no handles (max_tokens 0) that is all there is."""
    base = {"id": cid, "object": "text_completion", "created": created, "model": model}
    n = params.n
    for k in range(len(echoed) if echoed is not None else len(handles)):
        if echoed is not None:
            prefix, scored = echoed[k]
            prompt_lp = scores_of(scored)
            for i in range(n):
                choice = completion_choice(k * n + i, None, prefix, prompt_lp, params.logprobs)
                if handles:
                    choice["finish_reason"] = None
                yield {**base, "choices": [choice], "usage": None}
        for ev in handles[k].events() if handles else []:
            if not ev.text and ev.finish_reason is None:
                continue
            yield {
                **base,
                "choices": [
                    {
                        "text": ev.text,
                        "index": k * n + ev.index,
                        "logprobs": legacy_logprobs(ev.logprobs) if ev.logprobs else None,
                        "finish_reason": ev.finish_reason,
                    }
                ],
                "usage": None,
            }
    if include_usage:
        total = sum(r.completion_tokens for h in handles for r in h.result())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": total}
        yield {**base, "choices": [], "usage": {**usage, "total_tokens": prompt_tokens + total}}
