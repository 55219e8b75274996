"""Who rewrites the replies of a dataset from the logs (`tunery data from-logs --relabel-with`,
`POST /v1/tunery/datasets` with `relabel`), and the judge that may filter what it wrote.

A relabeler is `reply(conversations) -> replies`, greedy:
- a local model, anything `tunery compare` takes (`local_reply`);
- an OpenAI-compatible endpoint (`endpoint_reply`), through `data.synth.OpenAITeacher`, the client
  `tunery data synth --teacher-url` uses: `--relabel-url` on the command line, or on a server an
  endpoint the operator registered (`tunery serve --judge NAME=URL`);
- on a server, a model the key may call (builtin, registered, its own `ft:` model or alias), through
  the server's engine (`engine_reply`), so it shares the loaded weights with chat traffic.

The judge is `objectives.judge.Judge`, the one of `tunery data judge` and of the `rlaif` objective:
its template, its score parsing and its endpoint client. `from_logs.judge_relabeled` drops the
relabeled rows it scores below a minimum; rows a reviewer wrote are never judged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tunery.data.synth import OpenAITeacher
from tunery.errors import ConfigError
from tunery.evaluate.cli import _parse_model_arg
from tunery.generation.generate import chat_prompt, generate_batch
from tunery.generation.loading import load_for_inference
from tunery.generation.sequence import GenerationParams

Reply = Callable[[list[list[dict[str, Any]]]], list[str]]
WINDOW = 8  # requests one relabeling keeps in a server's engine at a time: chat traffic goes on


def local_reply(name: str, max_new_tokens: int) -> Reply:
    """Greedy answers of a local model (`M`, `M:ADAPTER_DIR`, a model or run dir), in batches."""
    spec, adapter = _parse_model_arg(name)
    model, tok = load_for_inference(spec, adapter)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def reply(conversations: list[list[dict[str, Any]]]) -> list[str]:
        prompts = [chat_prompt(tok, messages) for messages in conversations]
        return [r.text for r in generate_batch(model, tok, prompts, params)]

    return reply


def endpoint_reply(base_url: str, model: str, api_key: str | None, max_new_tokens: int) -> Reply:
    """Greedy answers of `model` at an OpenAI-compatible `base_url` (`tunery data synth`'s teacher)."""
    teacher = OpenAITeacher(base_url, model, api_key or "none")
    return lambda conversations: teacher.complete(conversations, 0.0, max_new_tokens)


def env_key(variable: str | None) -> str | None:
    return os.environ.get(variable) if variable else None


def _engine_texts(engine: Any, spec: str, adapter: str | None, max_new_tokens: int) -> Any:
    """`run(messages_list) -> texts`: greedy replies from a server engine, `WINDOW` at a time."""
    tok = engine.tokenizer(spec, adapter)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def run(conversations: list[list[dict[str, Any]]]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(conversations), WINDOW):
            handles = [
                engine.submit(spec, adapter, chat_prompt(tok, messages), params)
                for messages in conversations[start : start + WINDOW]
            ]
            out += [handle.result()[0].text for handle in handles]
        return out

    return run


def engine_reply(engine: Any, spec: str, adapter: str | None, max_new_tokens: int) -> Reply:
    """Greedy answers of a model a server serves, through its engine."""
    return _engine_texts(engine, spec, adapter, max_new_tokens)


def engine_judge_generate(engine: Any, spec: str, adapter: str | None, max_tokens: int) -> Any:
    """`Judge`'s `generate(texts) -> replies` for a judge model a server serves: each text is one
    user message, as `Judge` sends it to an endpoint."""
    run = _engine_texts(engine, spec, adapter, max_tokens)
    return lambda texts: run([[{"role": "user", "content": t}] for t in texts])


def check_min_score(min_score: float, max_score: float, param: str = "judge_min_score") -> None:
    if not 0 <= min_score <= max_score:
        raise ConfigError(
            f"The judge's minimum score must be between 0 and its top score {max_score:g}, "
            f"not {min_score:g}.",
            param=param,
        )
