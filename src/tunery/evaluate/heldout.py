"""Old model against new on the held-out slice of the logs (`tunery logs compare`, `POST /v1/tunery/compare`).

The slice is the test file `tunery data from-logs` (or `POST /v1/tunery/datasets`) writes beside the
train file: the most recent examples, which no model was trained on. Its reference replies are what a
reviewer accepted or corrected, whatever the file's shape: an SFT row's last assistant message, a DPO
row's preferred output, a KTO row's desirable completion (undesirable ones carry no reference and are
skipped).

Every model answers through a generation engine (`Engine`, or the server's engines: anything with
`tokenizer` and `submit`), one request at a time and greedily, so the latency of a request is that
model's alone, as an app calling it would see it. Scores reuse
`evaluate.metrics`: exact match always, classification metrics when the references form a label
set, chrF otherwise. Prompt tokens are counted per model with its own chat template: the seeds' claim
that a fine-tuned model needs shorter prompts than few-shot prompting shows up as a number.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from tunery.data.types import Conversation, Message, PreferencePair, Unpaired
from tunery.errors import DataError
from tunery.evaluate import metrics as M
from tunery.evaluate.generate import GenerationParams, chat_prompt
from tunery.evaluate.report import _clip, _num, _pct
from tunery.evaluate.run import _default_max_new_tokens, _last_user, split_example


@dataclass(frozen=True)
class Contender:
    """One model to compare: a label for the table, and what the engine loads."""

    label: str
    spec: str | None  # a base spec (alias or path); None: the adapter's own base
    adapter: str | None = None  # a saved model/adapter dir


@dataclass(frozen=True)
class Example:
    prompt: list[Message]
    tools: list[dict[str, Any]] | None
    reference: str


def examples_from(items: list[Any]) -> tuple[list[Example], int]:
    """(examples with a reference reply, how many had none) from loaded data of any from-logs shape."""
    out: list[Example] = []
    skipped = 0
    for item in items:
        if isinstance(item, Conversation):
            prompt, reference = split_example(item)
            out.append(Example(prompt, item.tools, reference))
        elif isinstance(item, PreferencePair):
            out.append(Example(item.prompt, item.tools, str(item.chosen[-1].get("content") or "")))
        elif isinstance(item, Unpaired) and item.desirable:
            out.append(Example(item.prompt, None, str(item.completion[-1].get("content") or "")))
        else:  # an undesirable KTO completion says what not to answer, not what to answer
            skipped += 1
    return out, skipped


def load_heldout(path: str | Path) -> tuple[list[Example], int]:
    """The held-out slice in `path` (SFT, DPO or KTO JSONL); a file with no reference is refused."""
    from tunery.data import load_dataset

    examples, skipped = examples_from(list(load_dataset(path).examples))
    if not examples:
        raise DataError(
            "no example with a reference reply to compare against",
            file=str(path),
            hint="Pass the test slice `tunery data from-logs` wrote (OUTPUT.test.jsonl).",
        )
    return examples, skipped


def _answer(
    engine: Any, who: Contender, examples: list[Example], max_new: int | None, label_set: bool
) -> dict[str, Any]:
    """Every example's reply from one model, with its latency and token counts."""
    tokenizer = engine.tokenizer(who.spec, who.adapter)
    if max_new is None:  # from the references, in this model's tokens
        max_new = _default_max_new_tokens(tokenizer, [e.reference for e in examples], label_set)
    params = GenerationParams(max_new_tokens=max_new)
    replies, latency, prompt_tokens, completion_tokens = [], [], [], []
    for ex in examples:
        ids = chat_prompt(tokenizer, ex.prompt, ex.tools)
        t0 = time.perf_counter()
        (result,) = engine.submit(who.spec, who.adapter, ids, params).result()
        latency.append((time.perf_counter() - t0) * 1000)
        replies.append(result.text)
        prompt_tokens.append(result.prompt_tokens)
        completion_tokens.append(result.completion_tokens)
    return {
        "replies": replies,
        "latency_ms": _spread(latency),
        "prompt_tokens": _spread(prompt_tokens),
        "completion_tokens": _spread(completion_tokens),
    }


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"mean": round(statistics.fmean(values), 2), "p50": statistics.median(values), "p95": p95}


def _scores(replies: list[str], refs: list[str], label_set: bool, labels: list[str] | None) -> dict:
    out: dict[str, Any] = {"exact_match": M.exact_match(replies, refs)}
    if label_set:
        cls = M.classification_metrics(replies, refs, labels)
        out.update({k: cls[k] for k in ("accuracy", "macro_f1", "weighted_f1", "invalid", "per_class")})
    else:
        out["chrf"] = M.chrf(replies, refs)
    return out


def compare_on_heldout(
    engine: Any,
    contenders: list[Contender],
    examples: list[Example],
    *,
    max_new_tokens: int | None = None,
    labels: list[str] | None = None,
    max_shown: int = 10,
) -> dict[str, Any]:
    """Each contender's scores, latency and token counts on `examples`, and where their replies differ."""
    refs = [e.reference for e in examples]
    label_set = bool(labels) or M.is_label_set(refs)
    rows, replies = [], {}
    for who in contenders:
        answered = _answer(engine, who, examples, max_new_tokens, label_set)
        replies[who.label] = answered.pop("replies")
        rows.append({"label": who.label, **_scores(replies[who.label], refs, label_set, labels), **answered})
    differ = [
        {
            "prompt": _last_user(ex.prompt),
            "reference": ex.reference,
            "replies": {label: got[i] for label, got in replies.items()},
        }
        for i, ex in enumerate(examples)
        if len({M.normalize(got[i]) for got in replies.values()}) > 1
    ]
    return {
        "n": len(examples),
        "task": "classification" if label_set else "generation",
        "models": rows,
        "n_disagreements": len(differ),
        "disagreements": differ[:max_shown],
    }


def render_heldout(result: dict[str, Any]) -> Group:
    """The comparison as rich tables: one row per model, then examples where their replies differ."""
    rows = result["models"]
    classification = result["task"] == "classification"
    table = Table(title=f"Held-out slice: {result['n']} examples")
    table.add_column("model", style="bold")
    cols = ["exact match", *(["accuracy", "macro F1", "invalid"] if classification else ["chrF"])]
    cols += ["latency p50 (ms)", "latency p95 (ms)", "prompt tokens", "reply tokens"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [_pct(r["exact_match"])]
        cells += (
            [_pct(r["accuracy"]), _num(r["macro_f1"]), str(r["invalid"])]
            if classification
            else [_num(r["chrf"], 1)]
        )
        cells += [
            _num(r["latency_ms"]["p50"], 0),
            _num(r["latency_ms"]["p95"], 0),
            _num(r["prompt_tokens"]["mean"], 1),
            _num(r["completion_tokens"]["mean"], 1),
        ]
        table.add_row(r["label"], *cells)
    parts: list[Any] = [table]
    if result["disagreements"]:
        shown = len(result["disagreements"])
        dis = Table(title=f"Where the replies differ ({result['n_disagreements']} examples, first {shown})")
        dis.add_column("prompt", overflow="fold")
        dis.add_column("reference")
        for r in rows:
            dis.add_column(r["label"], overflow="fold")
        for item in result["disagreements"]:
            cells = [_clip(item["replies"][r["label"]], 30) for r in rows]
            dis.add_row(_clip(item["prompt"], 50), _clip(item["reference"], 30), *cells)
        parts.append(dis)
    return Group(*parts)
