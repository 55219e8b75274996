"""The judge of RLAIF, `tunery data judge` and the relabeling of logged replies: a model that scores
each (prompt, completion). It is a local model loaded through Tunery (base spec plus optional adapter)
or any OpenAI-compatible endpoint (`base_url`, e.g. `tunery serve`). On a server, requests never carry
`base_url` or `api_key_env`: they name an `endpoint` the operator registered (`tunery serve --judge
NAME=URL --judge-key-env NAME=VAR`; docs/security.md).

The judge prompt is a template with `{prompt}` and `{completion}` placeholders (a file the user can
edit; `DEFAULT_JUDGE_TEMPLATE` below otherwise). The first number in the judge's reply is the score,
clamped to [0, max_score] and divided by max_score; a reply without a number scores 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError, TuneryError
from tunery.generation.generate import chat_prompt, generate_batch
from tunery.generation.sequence import GenerationParams
from tunery.methods import load_trained

DEFAULT_JUDGE_TEMPLATE = """You are grading an assistant's reply to a user.

User prompt:
{prompt}

Assistant reply:
{completion}

Rate how helpful, correct and clear the reply is on a scale from 0 (useless or wrong) to 10 \
(excellent). Answer with the number only."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # `names` marks what a field names, for the server's resolver (serve/resolver.py): requests may
    # name models, adapters and files it owns and endpoints the operator registered, never URLs or
    # environment variables.
    model: str | None = Field(
        None,
        description="Local judge: alias, directory, hub id or .gguf (on a server: alias or ft: model).",
        json_schema_extra={"names": "model", "adapter": "adapter"},
    )
    adapter: str | None = Field(
        None,
        description="Local judge: a saved model/adapter dir on `model`.",
        json_schema_extra={"names": "adapter"},
    )
    endpoint: str | None = Field(
        None,
        description="A judge endpoint registered on the server (`tunery serve --judge NAME=URL`), by name.",
        json_schema_extra={"names": "endpoint", "url": "base_url", "key_env": "api_key_env"},
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. http://host:8000/v1 (local runs only).",
        json_schema_extra={"names": "url"},
    )
    model_name: str | None = Field(None, description="The endpoint's model name (default: `model`).")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the endpoint's key (local runs only).",
        json_schema_extra={"names": "env"},
    )
    template: str | None = Field(
        None,
        description="Judge prompt template file ({prompt}, {completion}); on a server, a file id.",
        json_schema_extra={"names": "file"},
    )
    max_score: float = Field(10.0, gt=0, description="The template's top score; scores become score/max.")
    max_tokens: int = Field(16, ge=1, description="Tokens the judge may write before its number.")
    weight: float = Field(1.0, description="Weight of the judge's score in the summed reward.")


def load_template(path: str | None) -> str:
    if path is None:
        return DEFAULT_JUDGE_TEMPLATE
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"Judge template not found: {file}", param="judge.template")
    text = file.read_text(errors="replace")
    missing = [k for k in ("{prompt}", "{completion}") if k not in text]
    if missing:
        # The file's name, not its path: on a server that name is the file id the request gave.
        raise ConfigError(
            f"Judge template {file.name} lacks the placeholder(s) {', '.join(missing)}.",
            param="judge.template",
        )
    return text


def render_prompt(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text for the judge."""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages if m["role"] != "system")


def parse_score(reply: str, max_score: float) -> float | None:
    """The first number in the judge's reply, clamped to [0, max_score] and scaled to [0, 1]."""
    match = _NUMBER.search(reply)
    if match is None:
        return None
    return min(max(float(match.group()), 0.0), max_score) / max_score


class Judge:
    """Asks a judge model for a score per (prompt, completion). `generate(texts) -> replies`, when
    given, answers for a local `model` instead of loading it here (a server's engine already holds
    it: `workflows/relabel.py`)."""

    def __init__(self, options: JudgeOptions, generate: Callable[[list[str]], list[str]] | None = None):
        if options.endpoint and not options.base_url:
            raise ConfigError(
                f"judge.endpoint {options.endpoint!r} names a judge registered on a Tunery server "
                "(tunery serve --judge NAME=URL); a local run has no such registry.",
                hint="Set judge.base_url (and judge.api_key_env) instead.",
                param="judge.endpoint",
            )
        if not (options.model or options.adapter or options.base_url):
            raise ConfigError(
                "The judge needs a local model or an endpoint.",
                hint="Set judge.model (and judge.adapter) or judge.base_url and judge.model_name.",
                param="judge",
            )
        self.options = options
        self.template = load_template(options.template)
        self.unparsed = 0
        self._client: Any = None
        self._local: tuple[Any, Any] | None = None
        self._generate = generate
        if options.base_url:
            from openai import OpenAI

            if not (options.model_name or options.model):
                raise ConfigError(
                    "Name the endpoint's judge model: judge.model_name.", param="judge.model_name"
                )
            self._client = OpenAI(
                base_url=options.base_url,
                api_key=(os.environ.get(options.api_key_env) if options.api_key_env else None) or "none",
                max_retries=2,
            )
        elif generate is None:
            self._local = load_trained(options.model, options.adapter)

    def replies(self, prompts: list[str]) -> list[str]:
        o = self.options
        if self._client is not None:
            from openai import OpenAIError

            out = []
            for text in prompts:
                try:
                    resp = self._client.chat.completions.create(
                        model=o.model_name or o.model,
                        messages=[{"role": "user", "content": text}],
                        temperature=0,
                        max_tokens=o.max_tokens,
                    )
                except OpenAIError as exc:
                    raise TuneryError(
                        f"The judge endpoint {o.base_url} failed: {exc}", param="judge"
                    ) from None
                out.append(resp.choices[0].message.content or "")
            return out
        if self._generate is not None:
            return self._generate(prompts)
        model, tokenizer = self._local
        ids = [chat_prompt(tokenizer, [{"role": "user", "content": t}]) for t in prompts]
        results = generate_batch(model, tokenizer, ids, GenerationParams(max_new_tokens=o.max_tokens))
        return [r.text for r in results]

    def score(self, prompts: list[list[dict[str, Any]]], completions: list[str]) -> list[float]:
        texts = [
            self.template.replace("{prompt}", render_prompt(p)).replace("{completion}", c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        scores = []
        for reply in self.replies(texts):
            value = parse_score(reply, self.options.max_score)
            if value is None:
                self.unparsed += 1
            scores.append(0.0 if value is None else value)
        return scores


def judge_scorer(options: JudgeOptions) -> Callable[[list[str], list[dict[str, Any]]], list[float]]:
    judge = Judge(options)
    return lambda texts, examples: judge.score([e["messages"] for e in examples], texts)
