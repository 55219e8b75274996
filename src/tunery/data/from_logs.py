"""Training data from stored chat completions (`tunery data from-logs`, `POST /v1/tunery/datasets`).

The input is stored completions as plain dicts, the records `tunery logs export` writes (`id`,
`created_at`, `request`, `response`, `feedback`...), so this module never touches the server's
database: the CLI and the API read the rows and hand them over. Three shapes:

- `sft`: accepted replies (thumbs up or a score of 4-5; unrated ones too with `rating="any"`) and
  corrected replies, the correction in place of the reply: `{"messages": [...]}` rows.
- `dpo`: a correction preferred over the reply it corrects, or the latest accepted reply preferred
  over the latest rejected one (thumbs down or a score of 1-2) for the same prompt, in OpenAI's
  preference format (`input.messages`, `preferred_output`, `non_preferred_output`).
- `kto`: every rated reply as desirable (accepted) or undesirable (rejected), plus each correction
  as desirable: `{"prompt", "completion", "label"}` rows.

Prompts that differ only in whitespace or case count as one; the latest example wins. The most
recent `test_fraction` of the examples (by the time of their newest completion) is the test slice:
it stands for the traffic the next model will see.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tunery.data.validate import validate_file
from tunery.errors import DataError, TuneryError
from tunery.fsutil import replace_durably

SHAPES = ("sft", "dpo", "kto")
RATING_FILTERS = ("up", "down", "any", "rated")
# The validator's method for each shape: the OpenAI method where there is one, so the file is
# exactly what a `supervised` or `dpo` job accepts.
VALIDATE_AS = {"sft": "supervised", "dpo": "dpo", "kto": "kto"}
# The data kind each shape is checked as where `VALIDATE_AS` names no OpenAI method type.
_VALIDATE_KIND = {"kto": "unpaired"}
MAX_TEST_FRACTION = 0.5
# Message fields kept from a request: what the chat format accepts (data/messages.py).
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


@dataclass
class Report:
    """What a build kept and dropped, counted in stored completions (a DPO pair uses two)."""

    shape: str
    rows: int = 0
    kept: Counter = field(default_factory=Counter)  # why an example was made -> examples
    dropped: Counter = field(default_factory=Counter)  # why a completion was left out -> completions
    train: int = 0
    test: int = 0
    relabeled: int | None = None  # train replies a stronger model rewrote (`relabel`); None: not asked
    judge_dropped: int | None = None  # relabeled rows the judge scored too low; None: no judge asked

    def to_dict(self) -> dict[str, Any]:
        out = {
            "shape": self.shape,
            "completions": self.rows,
            "examples": self.train + self.test,
            "train": self.train,
            "test": self.test,
            "kept": {k: n for k, n in sorted(self.kept.items()) if n},
            "dropped": {k: n for k, n in sorted(self.dropped.items()) if n},
        }
        if self.relabeled is not None:
            out["relabeled"] = self.relabeled
        if self.judge_dropped is not None:
            out["judge_dropped"] = self.judge_dropped
        return out


@dataclass
class Built:
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    report: Report
    train_why: list[str] = field(default_factory=list)  # why each train row was kept, in order


@dataclass
class _Example:
    row: dict[str, Any]  # what is written
    key: tuple  # the de-duplication key: the normalised prompt (and, for KTO, the label)
    time: int
    sources: int  # stored completions it was made from
    why: str


def verdict(feedback: dict[str, Any] | None) -> str | None:
    """ "good", "bad" or "neutral" for a rating (up / 4-5, down / 1-2, 3); None when unrated."""
    if not feedback or feedback.get("rating") is None:
        return None
    rating = feedback["rating"]
    if rating == "up" or (type(rating) is int and rating >= 4):
        return "good"
    if rating == "down" or (type(rating) is int and rating <= 2):
        return "bad"
    return "neutral"


def matches_rating(record: dict[str, Any], rating: str) -> bool:
    """The `--rating` filter: up (accepted, or corrected: a correction is what the reply should
    have been), down (rejected), rated (any rating), any (rated or not)."""
    fb = record.get("feedback")
    v = verdict(fb)
    if rating == "any":
        return True
    if rating == "rated":
        return v is not None
    if rating == "up":
        return v == "good" or bool(fb and fb.get("corrected"))
    return v == "bad"


def _prompt(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: m[k] for k in MESSAGE_FIELDS if k in m}
        for m in (record.get("request") or {}).get("messages") or []
        if isinstance(m, dict)
    ]


def _reply(record: dict[str, Any]) -> str:
    choices = (record.get("response") or {}).get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "")


def _text(content: Any) -> str:
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return " ".join(str(content or "").split()).lower()


def prompt_key(messages: list[dict[str, Any]]) -> tuple:
    """Near-identical prompts share a key: whitespace runs and case do not count."""
    return tuple((m.get("role"), _text(m.get("content"))) for m in messages)


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _sft(rec: dict[str, Any], include_unrated: bool, report: Report) -> _Example | None:
    fb, v, prompt = rec.get("feedback"), verdict(rec.get("feedback")), _prompt(rec)
    corrected = (fb or {}).get("corrected")
    if corrected:
        reply, why = corrected, "corrected"
    elif v == "good" or (v is None and include_unrated):
        reply, why = _reply(rec), "accepted" if v else "unrated"
    else:
        report.dropped[{None: "unrated", "bad": "rated down", "neutral": "neutral score"}[v]] += 1
        return None
    if not reply.strip():
        report.dropped["empty reply"] += 1
        return None
    row: dict[str, Any] = {"messages": [*prompt, _assistant(reply)]}
    if (rec.get("request") or {}).get("tools"):
        row["tools"] = rec["request"]["tools"]
    return _Example(row, prompt_key(prompt), rec["created_at"], 1, why)


def _pair(prompt: list, tools: Any, chosen: str, rejected: str) -> dict[str, Any]:
    inp: dict[str, Any] = {"messages": prompt}
    if tools:
        inp["tools"] = tools
    return {
        "input": inp,
        "preferred_output": [_assistant(chosen)],
        "non_preferred_output": [_assistant(rejected)],
    }


def _dpo(records: list[dict[str, Any]], report: Report) -> list[_Example]:
    out: list[_Example] = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        fb = rec.get("feedback") or {}
        prompt, reply, corrected = _prompt(rec), _reply(rec), fb.get("corrected")
        if corrected and corrected.strip() != reply.strip() and reply.strip():
            row = _pair(prompt, rec["request"].get("tools"), corrected, reply)
            out.append(_Example(row, prompt_key(prompt), rec["created_at"], 1, "corrected over original"))
        elif corrected:
            report.dropped["correction equals the reply"] += 1
        elif verdict(fb) is None:
            report.dropped["unrated"] += 1
        else:
            groups.setdefault(prompt_key(prompt), []).append(rec)
    for key, group in groups.items():
        group.sort(key=lambda r: r["created_at"])
        good = [r for r in group if verdict(r["feedback"]) == "good" and _reply(r).strip()]
        bad = [r for r in group if verdict(r["feedback"]) == "bad" and _reply(r).strip()]
        if not (good and bad):
            report.dropped["no pair"] += len(group)
            continue
        chosen, rejected = good[-1], bad[-1]
        row = _pair(_prompt(chosen), chosen["request"].get("tools"), _reply(chosen), _reply(rejected))
        when = max(chosen["created_at"], rejected["created_at"])
        out.append(_Example(row, key, when, 2, "up over down"))
        if len(group) > 2:  # the older replies to the same prompt
            report.dropped["duplicate prompt"] += len(group) - 2
    return out


def _kto(rec: dict[str, Any], report: Report) -> list[_Example]:
    fb, v, prompt = rec.get("feedback") or {}, verdict(rec.get("feedback")), _prompt(rec)
    reply, corrected = _reply(rec), fb.get("corrected")
    out = []
    if v in ("good", "bad") and reply.strip():
        label = v == "good"
        row = {"prompt": prompt, "completion": [_assistant(reply)], "label": label}
        out.append(_Example(row, (*prompt_key(prompt), label), rec["created_at"], 1, _LABEL[label]))
    if corrected and corrected.strip() and not (v == "good" and corrected.strip() == reply.strip()):
        row = {"prompt": prompt, "completion": [_assistant(corrected)], "label": True}
        out.append(_Example(row, (*prompt_key(prompt), True), rec["created_at"], 1, "corrected"))
    if not out:
        reason = {None: "unrated", "neutral": "neutral score"}.get(v, "empty reply")
        report.dropped[reason] += 1
    return out


_LABEL = {True: "desirable", False: "undesirable"}


def build(
    records: list[dict[str, Any]], shape: str = "sft", rating: str = "rated", test_fraction: float = 0.1
) -> Built:
    """Shape `records` (already selected by model, metadata and time) into train and test rows."""
    check_options(shape, rating, test_fraction)
    report = Report(shape, rows=len(records))
    for rec in records:  # every completion read is accounted for: kept, or dropped with a reason
        if not matches_rating(rec, rating):
            report.dropped["unrated" if verdict(rec.get("feedback")) is None else f"not {rating}"] += 1
    records = [r for r in records if matches_rating(r, rating)]
    if shape == "sft":
        made = [e for r in records if (e := _sft(r, rating == "any", report)) is not None]
    elif shape == "dpo":
        made = _dpo(records, report)
    else:
        made = [e for r in records for e in _kto(r, report)]
    latest: dict[tuple, _Example] = {}
    for ex in sorted(made, key=lambda e: e.time):  # a later example replaces an earlier one
        if ex.key in latest:
            report.dropped["duplicate prompt"] += latest[ex.key].sources
        latest[ex.key] = ex
    kept = sorted(latest.values(), key=lambda e: e.time)
    report.kept.update(e.why for e in kept)
    n_test = int(len(kept) * test_fraction)
    train, test = kept[: len(kept) - n_test], kept[len(kept) - n_test :]
    report.train, report.test = len(train), len(test)
    return Built([e.row for e in train], [e.row for e in test], report, [e.why for e in train])


def relabel(built: Built, reply: Any) -> list[int]:
    """Replace the train replies no reviewer wrote with `reply(messages)`, a stronger model's answer
    to the same conversation (distillation, seed 000). Corrected replies are a reviewer's own and
    stay; the held-out slice stays as reviewed, so it still measures against human judgement.
    Returns the indices of the train rows rewritten."""
    if built.report.shape != "sft":
        raise TuneryError("--relabel-with applies to --shape sft only.", param="relabel_with")
    built.report.relabeled = 0
    todo = [i for i, why in enumerate(built.train_why) if why != "corrected"]
    if not todo:
        return []
    answers = reply([built.train[i]["messages"][:-1] for i in todo])
    done = []
    for i, text in zip(todo, answers, strict=True):
        if text.strip():
            built.train[i]["messages"][-1] = _assistant(text)
            built.report.relabeled += 1
            done.append(i)
    return done


def judge_relabeled(built: Built, rows: list[int], score: Any, min_score: float, max_score: float) -> None:
    """Drop the relabeled train rows `rows` whose reply the judge scores below `min_score` (on the
    judge template's scale, 0 to `max_score`). `score(prompts, replies)` is `Judge.score`: scores
    scaled to [0, 1], a reply without a number scoring 0. Rows a reviewer wrote are never judged."""
    built.report.judge_dropped = 0
    if not rows:
        return
    scores = score(
        [built.train[i]["messages"][:-1] for i in rows],
        [str(built.train[i]["messages"][-1]["content"]) for i in rows],
    )
    low = {i for i, s in zip(rows, scores, strict=True) if s * max_score < min_score - 1e-9}
    if not low:
        return
    for i in sorted(low):
        built.report.kept[built.train_why[i]] -= 1
    built.report.kept = +built.report.kept  # a reason with no example left is not listed
    built.report.dropped[f"judge score below {min_score:g}"] += len(low)
    built.report.judge_dropped = len(low)
    keep = [i for i in range(len(built.train)) if i not in low]
    built.train = [built.train[i] for i in keep]
    built.train_why = [built.train_why[i] for i in keep]
    built.report.train = len(built.train)


def check_options(shape: str, rating: str, test_fraction: float) -> None:
    if shape not in SHAPES:
        raise TuneryError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}.", param="shape")
    if rating not in RATING_FILTERS:
        raise TuneryError(
            f"rating must be one of {', '.join(RATING_FILTERS)}, not {rating!r}.", param="rating"
        )
    if not 0 <= test_fraction <= MAX_TEST_FRACTION:
        raise TuneryError(
            f"test_fraction must be between 0 and {MAX_TEST_FRACTION}, not {test_fraction!r}.",
            param="test_fraction",
        )


def parse_time(value: str | int | None, name: str, *, end: bool = False) -> int | None:
    """`--since`/`--until` as unix seconds: an ISO date or date-time (no zone: UTC), or seconds.
    A bare date as the end of a range includes that whole day."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TuneryError(f"{name} must be an ISO date or date-time, not {value!r}.", param=name)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise TuneryError(
            f"{name} must be an ISO date or date-time like 2025-01-31 or 2025-01-31T12:00, not {value!r}.",
            param=name,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(value) == 10:  # a bare date: up to the end of that day
        when += timedelta(days=1)
    return int(when.timestamp())


def holdout_path(output: Path) -> Path:
    """Where the test slice of `output` goes: `out.jsonl` -> `out.test.jsonl`."""
    return output.with_name(f"{output.stem}.test{output.suffix}")


def write_validated(rows: list[dict[str, Any]], path: Path, shape: str) -> None:
    """Write `rows` as JSONL, check the file with Tunery's validator for `shape`, then move it into
    place: a file that would not train is never left where a job would pick it up."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # The example count is checked when a job starts (a small file may be a validation file).
        report = validate_file(tmp, method=VALIDATE_AS[shape], kind=_VALIDATE_KIND.get(shape), min_examples=1)
        if not report.ok:
            first = report.errors[0]
            raise DataError(
                f"The {shape} rows built from the logs do not validate: {first.message}",
                file=str(path),
                line=first.line,
                code="invalid_dataset",
            )
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(built: Built, output: Path) -> list[Path]:
    """Write the train rows to `output` and the test rows beside it; returns the paths written. A
    test file left from an earlier build is removed when this one has no test slice, so the pair
    on disk always comes from one build."""
    if output.suffix.lower() != ".jsonl":
        raise TuneryError(f"--output must be a .jsonl file, not {output}.", param="output")
    if not built.train:
        raise DataError(
            "No examples to write: "
            + (
                f"every selected completion was dropped ({reasons(built.report)})."
                if built.report.rows
                else "no stored completion matched the selection (model, metadata, key, since/until)."
            ),
            code="empty_dataset",
        )
    written = [output]
    write_validated(built.train, output, built.report.shape)
    if built.test:
        write_validated(built.test, holdout_path(output), built.report.shape)
        written.append(holdout_path(output))
    else:
        holdout_path(output).unlink(missing_ok=True)
    return written


def reasons(report: Report) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(report.dropped.items())) or "none kept"


def report_lines(report: Report) -> list[str]:
    """The report as lines for a terminal."""
    lines = [
        f"{report.rows} stored completion(s) selected; {report.train + report.test} {report.shape} "
        f"example(s): {report.train} train, {report.test} test.",
    ]
    lines += [f"  kept    {n:>6}  {why}" for why, n in sorted(report.kept.items())]
    lines += [f"  dropped {n:>6}  {why}" for why, n in sorted(report.dropped.items())]
    if report.relabeled is not None:
        lines.append(f"  relabeled {report.relabeled} train repl(ies) with the stronger model")
    if report.judge_dropped is not None:
        lines.append(f"  the judge dropped {report.judge_dropped} relabeled repl(ies) below its minimum")
    return lines
