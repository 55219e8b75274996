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

A row may name its task (a top-level string `task`, else `source`), as a multi-task mix does; with
several files and no such field, each file is a task. The result then also scores each task on its
own (`per_task`). `sample` draws a fixed-seed sample, so a slow comparison can run on part of a slice.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from tunery.data import load_dataset
from tunery.data.tasks import file_task
from tunery.data.types import Conversation, PreferencePair, Unpaired
from tunery.errors import DataError
from tunery.evaluate import metrics as M
from tunery.evaluate.report import _clip, _num, _pct
from tunery.evaluate.run import _default_max_new_tokens, _last_user, split_example
from tunery.evaluate.scoring import Example, per_task, scores
from tunery.generation.generate import chat_prompt
from tunery.generation.sequence import GenerationParams


@dataclass(frozen=True)
class Contender:
    """One model to compare: a label for the table, and what the engine loads."""

    label: str
    spec: str | None  # a base spec (alias or path); None: the adapter's own base
    adapter: str | None = None  # a saved model/adapter dir


def _task_name(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    name = row.get("task", row.get("source"))
    return name.strip() if isinstance(name, str) and name.strip() else None


def examples_from(items: list[Any], tasks: dict[int, str] | None = None) -> tuple[list[Example], int]:
    """(examples with a reference reply, how many had none) from loaded data of any from-logs shape;
    `tasks` maps a row's line to its task name."""
    out: list[Example] = []
    skipped = 0
    tasks = tasks or {}
    for item in items:
        task = tasks.get(item.line)
        if isinstance(item, Conversation):
            prompt, reference = split_example(item)
            out.append(Example(prompt, item.tools, reference, task or _task_name(item.extra)))
        elif isinstance(item, PreferencePair):
            out.append(Example(item.prompt, item.tools, str(item.chosen[-1].get("content") or ""), task))
        elif isinstance(item, Unpaired) and item.desirable:
            out.append(Example(item.prompt, None, str(item.completion[-1].get("content") or ""), task))
        else:  # an undesirable KTO completion says what not to answer, not what to answer
            skipped += 1
    return out, skipped


def _row_tasks(path: Path) -> dict[int, str]:
    """Line -> task name of a JSONL file's rows that name one (any shape keeps its extra fields)."""
    if path.suffix.lower() != ".jsonl":
        return {}
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                name = _task_name(json.loads(line))
            except ValueError:
                continue
            if name:
                out[n] = name
    return out


def load_heldout(path: str | Path | Sequence[str | Path]) -> tuple[list[Example], int]:
    """The held-out slice in `path` (SFT, DPO or KTO JSONL), or in several files (one per task);
    a file with no reference is refused."""
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    examples: list[Example] = []
    skipped = 0
    for one in paths:
        got, missed = examples_from(list(load_dataset(one).examples), _row_tasks(one))
        if not got:
            raise DataError(
                "no example with a reference reply to compare against",
                file=str(one),
                hint="Pass the test slice `tunery data from-logs` wrote (OUTPUT.test.jsonl).",
            )
        if len(paths) > 1:
            got = [e if e.task else Example(e.prompt, e.tools, e.reference, file_task(one)) for e in got]
        examples += got
        skipped += missed
    return examples, skipped


def sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """At most `n` examples, drawn with a fixed seed and kept in file order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def _answer(
    engine: Any,
    who: Contender,
    examples: list[Example],
    max_new: int | None,
    label_set: bool,
    step: Callable[[], None],
) -> dict[str, Any]:
    """Every example's reply from one model, with its latency and token counts; `step()` after each."""
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
        step()
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


def compare_on_heldout(
    engine: Any,
    contenders: list[Contender],
    examples: list[Example],
    *,
    max_new_tokens: int | None = None,
    labels: list[str] | None = None,
    max_shown: int = 10,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Each contender's scores, latency and token counts on `examples`, and where their replies
    differ; `on_progress(done, total)` after each reply (total: examples times contenders)."""
    refs = [e.reference for e in examples]
    label_set = bool(labels) or M.is_label_set(refs)
    rows, replies = [], {}
    done, total = [0], len(examples) * len(contenders)

    def step() -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], total)

    for who in contenders:
        answered = _answer(engine, who, examples, max_new_tokens, label_set, step)
        replies[who.label] = answered.pop("replies")
        rows.append({"label": who.label, **scores(replies[who.label], refs, label_set, labels), **answered})
    differ = [
        {
            "prompt": _last_user(ex.prompt),
            "reference": ex.reference,
            "replies": {label: got[i] for label, got in replies.items()},
        }
        for i, ex in enumerate(examples)
        if len({M.normalize(got[i]) for got in replies.values()}) > 1
    ]
    out = {
        "n": len(examples),
        "task": "classification" if label_set else "generation",
        "models": rows,
        "n_disagreements": len(differ),
        "disagreements": differ[:max_shown],
    }
    tasks = per_task(examples, replies, labels)
    if tasks is not None:
        out["per_task"] = tasks
    return out


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
    if result.get("per_task"):
        parts.append(_task_table(result["per_task"]))
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


def _task_table(tasks: dict[str, Any]) -> Table:
    """One row per task and model: exact match, and accuracy or chrF by the task's kind."""
    table = Table(title="Per task")
    for col in ("task", "examples", "model", "exact match", "accuracy / chrF"):
        table.add_column(col, justify="left" if col in ("task", "model") else "right")
    for name, task in tasks.items():
        for r in task["models"]:
            score = _pct(r["accuracy"]) if task["task"] == "classification" else _num(r["chrf"], 1)
            table.add_row(name, str(task["n"]), r["label"], _pct(r["exact_match"]), score)
    return table
