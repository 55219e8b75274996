"""Synthetic training data from a teacher model (`tunery data synth`).

Two modes:
- generate: the teacher sees the task description and a few seed examples and writes a new
  `{"input": ..., "output": ...}` pair (JSON) per request;
- label (`inputs` given): the teacher answers each given input, as distillation.

Every candidate then passes the filters in order: parse -> length -> label validity (when `labels`
is set) -> exact duplicate -> near duplicate (word 3-gram Jaccard, against seeds and kept rows) ->
optional judge score. Kept rows are written as chat JSONL with a `provenance` field (teacher, mode,
prompt seeds, judge score, time); `stats` counts every candidate under exactly one outcome.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from tunery.data.readers import read_records
from tunery.data.stats import jaccard, normalize, shingles
from tunery.errors import DataError, TuneryError

_JSON_OBJ = re.compile(r"\{.*\}", re.DOTALL)
_SCORE = re.compile(r"\b(10|[1-9])\b")


class Teacher(Protocol):
    description: dict[str, Any]

    def complete(self, prompts: list[list[dict[str, Any]]], temperature: float, max_tokens: int) -> list[str]:
        """One reply per chat prompt."""


@dataclass
class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, `tunery serve`) through the openai SDK."""

    base_url: str
    model: str
    api_key: str = "none"

    def __post_init__(self) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=1)
        self.description = {"type": "openai", "base_url": self.base_url, "model": self.model}

    def complete(self, prompts: list[list[dict[str, Any]]], temperature: float, max_tokens: int) -> list[str]:
        import openai

        out = []
        for messages in prompts:
            try:
                resp = self.client.chat.completions.create(
                    model=self.model,
                    messages=cast(Any, messages),
                    temperature=temperature,
                    max_tokens=max_tokens,
                )
            except openai.APIError as exc:
                raise TuneryError(f"The teacher at {self.base_url} failed: {exc}", param="teacher") from None
            out.append(resp.choices[0].message.content or "")
        return out


@dataclass
class SynthSettings:
    task: str
    n: int = 100
    seeds_per_prompt: int = 3
    temperature: float = 0.9
    max_tokens: int = 256
    min_chars: int = 1
    max_chars: int = 4000
    labels: list[str] | None = None  # replies must be one of these (classification data)
    near_threshold: float = 0.8
    min_judge_score: float | None = None  # 1-10, scored by `judge` (defaults to the teacher)
    max_requests: int | None = None  # give up after this many candidates (default 4 x n)
    seed: int = 0
    system_prompt: str | None = None  # written into each row's messages


@dataclass
class SynthResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"reason", "text"}
    stats: dict[str, int] = field(default_factory=dict)


def read_seeds(path: str | Path) -> list[dict[str, str]]:
    """Seed examples as {"input", "output"}: from chat rows (last user / last assistant message),
    prompt/completion rows, or input/output rows."""
    seeds = []
    for line, rec in read_records(path).records:
        if not isinstance(rec, dict):
            raise DataError("expected a JSON object", file=str(path), line=line)
        if "messages" in rec:
            msgs = rec["messages"]
            users = [m.get("content") for m in msgs if m.get("role") == "user"]
            replies = [m.get("content") for m in msgs if m.get("role") == "assistant"]
            if not users or not replies:
                raise DataError(
                    "needs a user and an assistant message", file=str(path), line=line, field="messages"
                )
            seeds.append({"input": str(users[-1]), "output": str(replies[-1])})
        elif "input" in rec and "output" in rec:
            seeds.append({"input": str(rec["input"]), "output": str(rec["output"])})
        elif "prompt" in rec and "completion" in rec:
            seeds.append({"input": str(rec["prompt"]), "output": str(rec["completion"])})
        else:
            raise DataError(
                "a seed needs messages, input/output or prompt/completion", file=str(path), line=line
            )
    return seeds


def generation_prompt(task: str, shots: list[dict[str, str]]) -> list[dict[str, Any]]:
    examples = "\n".join(json.dumps(s, ensure_ascii=False) for s in shots)
    return [
        {
            "role": "system",
            "content": "You write new, varied training examples for a task. "
            'Reply with exactly one JSON object {"input": ..., "output": ...} and nothing else.',
        },
        {
            "role": "user",
            "content": f"Task: {task}\n\nExamples:\n{examples}\n\nWrite one new example "
            "that differs from these.",
        },
    ]


def label_prompt(task: str, shots: list[dict[str, str]], text: str) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": task}]
    for s in shots:
        msgs += [{"role": "user", "content": s["input"]}, {"role": "assistant", "content": s["output"]}]
    return [*msgs, {"role": "user", "content": text}]


def judge_prompt(task: str, pair: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "role": "system",
            "content": "You grade training examples. Reply with one integer from 1 "
            "(useless or wrong) to 10 (correct and useful).",
        },
        {
            "role": "user",
            "content": f"Task: {task}\nInput: {pair['input']}\nOutput: {pair['output']}\nScore:",
        },
    ]


def parse_pair(text: str) -> dict[str, str] | None:
    """The first JSON object with string-able `input` and `output`, or `Input:`/`Output:` lines."""
    m = _JSON_OBJ.search(text)
    if m:
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("input") is not None and obj.get("output") is not None:
            return {"input": str(obj["input"]).strip(), "output": str(obj["output"]).strip()}
    m2 = re.search(r"input:\s*(.+?)\s*output:\s*(.+)", text, re.IGNORECASE | re.DOTALL)
    if m2:
        return {"input": m2.group(1).strip(), "output": m2.group(2).strip()}
    return None


def parse_score(text: str) -> float | None:
    m = _SCORE.search(text)
    return float(m.group(1)) if m else None


class _Filter:
    """Length, label, exact and near-duplicate checks, remembering what was kept."""

    def __init__(self, s: SynthSettings, seeds: list[dict[str, str]]):
        self.s = s
        self.labels = {normalize(x): x for x in s.labels} if s.labels else None
        self.exact: set[str] = set()
        self.kept_shingles: list[set[str]] = []
        for seed in seeds:
            self.remember(seed)

    def key(self, pair: dict[str, str]) -> str:
        return normalize(pair["input"]) + "\x00" + normalize(pair["output"])

    def remember(self, pair: dict[str, str]) -> None:
        self.exact.add(self.key(pair))
        self.kept_shingles.append(shingles(pair["input"] + " " + pair["output"]))

    def reason(self, pair: dict[str, str]) -> str | None:
        total = len(pair["input"]) + len(pair["output"])
        if not pair["input"] or not pair["output"] or total < self.s.min_chars:
            return "too_short"
        if total > self.s.max_chars:
            return "too_long"
        if self.labels is not None:
            label = self.labels.get(normalize(pair["output"]).rstrip(".!"))
            if label is None:
                return "invalid_label"
            pair["output"] = label  # canonical spelling: "Positive." -> "positive"
        if self.key(pair) in self.exact:
            return "exact_duplicate"
        sh = shingles(pair["input"] + " " + pair["output"])
        if any(jaccard(sh, k) >= self.s.near_threshold for k in self.kept_shingles):
            return "near_duplicate"
        return None


def synthesize(
    teacher: Teacher,
    settings: SynthSettings,
    seeds: list[dict[str, str]],
    inputs: list[str] | None = None,
    judge: Teacher | None = None,
) -> SynthResult:
    """Generate up to `settings.n` filtered examples (fewer when `max_requests` runs out)."""
    s = settings
    if not seeds and inputs is None:
        raise TuneryError(
            "data synth needs seed examples (--seeds) to show the teacher the format.", param="seeds"
        )
    rng = random.Random(s.seed)
    filt = _Filter(s, seeds)
    result = SynthResult(stats={"requested": 0, "kept": 0})
    budget = s.max_requests or (len(inputs) if inputs is not None else 4 * s.n)
    queue = list(inputs or [])
    judge = judge or teacher
    batch = 8
    while result.stats["kept"] < s.n and result.stats["requested"] < budget:
        k = min(batch, budget - result.stats["requested"], s.n - result.stats["kept"])
        shot_sets = [rng.sample(seeds, min(s.seeds_per_prompt, len(seeds))) for _ in range(k)]
        if inputs is not None:
            texts = [queue.pop(0) for _ in range(min(k, len(queue)))]
            if not texts:
                break
            shot_sets = shot_sets[: len(texts)]
            prompts = [label_prompt(s.task, sh, t) for sh, t in zip(shot_sets, texts, strict=True)]
            replies = teacher.complete(prompts, s.temperature, s.max_tokens)
            pairs: list[dict[str, str] | None] = [
                {"input": t, "output": r.strip()} for t, r in zip(texts, replies, strict=True)
            ]
        else:
            prompts = [generation_prompt(s.task, sh) for sh in shot_sets]
            replies = teacher.complete(prompts, s.temperature, s.max_tokens)
            pairs = [parse_pair(r) for r in replies]
        result.stats["requested"] += len(prompts)
        for pair, reply, shots in zip(pairs, replies, shot_sets, strict=True):
            why = "unparseable" if pair is None else filt.reason(pair)
            score = None
            if why is None and pair is not None and s.min_judge_score is not None:
                score = parse_score(judge.complete([judge_prompt(s.task, pair)], 0.0, 8)[0])
                if score is None or score < s.min_judge_score:
                    why = "judge_score"
            if why is not None or result.stats["kept"] >= s.n:
                why = why or "over_n"
                result.stats[why] = result.stats.get(why, 0) + 1
                result.rejected.append({"reason": why, "text": reply, "judge_score": score})
                continue
            assert pair is not None  # `why` is None only for a parsed pair
            filt.remember(pair)
            result.stats["kept"] += 1
            result.rows.append(_row(pair, s, teacher, shots, score, inputs is not None))
    return result


def _row(
    pair: dict[str, str],
    s: SynthSettings,
    teacher: Teacher,
    shots: list[dict[str, str]],
    score: float | None,
    labeled: bool,
) -> dict[str, Any]:
    messages = [{"role": "system", "content": s.system_prompt}] if s.system_prompt else []
    messages += [{"role": "user", "content": pair["input"]}, {"role": "assistant", "content": pair["output"]}]
    return {
        "messages": messages,
        "provenance": {
            "source": "synthetic",
            "mode": "label" if labeled else "generate",
            "teacher": teacher.description,
            "task": s.task,
            "seed_inputs": [x["input"] for x in shots],
            "temperature": s.temperature,
            "judge_score": score,
            "created_at": int(time.time()),
        },
    }


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p
