"""Check a data file the way OpenAI's fine-tuning service and cookbook do, before any model loads.

Every problem is an `Issue` with the line it comes from. Item codes are the cookbook's
(`missing_messages_list`, `message_missing_key`, `message_unrecognized_key`, `unrecognized_role`,
`missing_content`, `example_missing_assistant_message`, ...); the report's `openai_error()` is what
the service answers for the first problem: code `invalid_n_examples` or `invalid_training_file`
and a message such as "Invalid file format. Example 100, message 2 Discriminator 'role' is missing
in value" (the server prefixes "The job failed due to an invalid training file.").

OpenAI's method names are strict as OpenAI is (`supervised` refuses preference pairs); Tunery's
objective names accept the loader's conversions (`sft` trains on the chosen reply of a pair).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from tunery.data import encode as enc
from tunery.data.formats import FORMAT_KIND, convert_records, detect_format
from tunery.data.readers import Records, read_records
from tunery.data.types import Conversation, Labeled, PreferencePair, Text, Unpaired
from tunery.errors import ConfigError, DataError

MIN_EXAMPLES = 10
MAX_KEPT_ISSUES = 50  # all are counted; only the first ones are kept for the report

# OpenAI's fine-tuning `method.type` -> (data kind, the only native formats its service accepts). A
# Tunery objective is validated against its own `data_kind`, which the caller passes as `kind`
# (`objectives.validation_kind`), and accepts whatever the loader converts.
OPENAI_FORMATS: dict[str, tuple[str, frozenset[str]]] = {
    "supervised": ("chat", frozenset({"chat"})),
    "dpo": ("preference", frozenset({"preference"})),
    "reinforcement": ("prompt", frozenset({"chat", "prompt"})),
}


def kind_for_method(method: str, kind: str | None = None) -> tuple[str, frozenset[str] | None]:
    """(data kind, native formats accepted; None = whatever the loader can convert) to check `method`
    with: the caller's `kind` (an objective's `data_kind`), else OpenAI's rules for its method types."""
    if kind is not None:
        return kind, None
    if method in OPENAI_FORMATS:
        return OPENAI_FORMATS[method]
    raise ConfigError(
        f"Unknown method {method!r} for validation.",
        hint=f"Use one of: {', '.join(OPENAI_FORMATS)}, or an objective (sft, dpo, kto, ...).",
        param="method",
    )


@dataclass
class Issue:
    line: int | None
    field: str | None
    code: str
    message: str
    openai: str | None = None  # OpenAI's wording of the same problem

    @classmethod
    def from_error(cls, err: DataError) -> Issue:
        return cls(err.line, err.field, err.code, _bare_message(err), getattr(err, "openai", None))


def _bare_message(err: DataError) -> str:
    """The message without DataError's "file, line N, field 'x': " prefix (the report has columns)."""
    prefix = ", ".join(
        p
        for p in (
            err.file,
            f"line {err.line}" if err.line else None,
            f"field '{err.field}'" if err.field else None,
        )
        if p
    )
    return err.message[len(prefix) + 2 :] if prefix and err.message.startswith(prefix + ": ") else err.message


@dataclass
class ValidationReport:
    path: str
    method: str
    kind: str
    format: str = "unknown"
    n: int = 0  # examples in the file (objects read, plus lines that failed to parse)
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    n_errors: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def add_error(self, issue: Issue) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_KEPT_ISSUES:
            self.errors.append(issue)

    def openai_error(self) -> dict[str, Any] | None:
        """The first problem as OpenAI's service words it: {"code", "message", "param"}."""
        if not self.errors:
            return None
        first = self.errors[0]
        if first.code == "invalid_n_examples":
            return {"code": "invalid_n_examples", "message": first.message, "param": "training_file"}
        detail = first.openai or (f"Example {first.line}: {first.message}" if first.line else first.message)
        if not detail.startswith(("Invalid file format", "Unexpected file format")):
            detail = f"Invalid file format. {detail}"
        if first.line and f"Example {first.line}" not in detail and f"line {first.line}" not in detail:
            # OpenAI's wrong-format sentences name no example; the user still needs to know where.
            detail += f" (line {first.line})"
        return {"code": "invalid_training_file", "message": detail, "param": "training_file"}

    def raise_for_errors(self) -> None:
        """Raise the first error as a `DataError` (OpenAI's code), for `tunery train`."""
        if self.ok:
            return
        first = self.errors[0]
        more = f" ({self.n_errors} errors in all)" if self.n_errors > 1 else ""
        raise DataError(
            first.message + more,
            hint=f"Run `tunery data validate {self.path}` for the full report.",
            file=self.path,
            line=first.line,
            field=first.field,
            code=(self.openai_error() or {}).get("code"),
            param="training_file",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "method": self.method,
            "kind": self.kind,
            "format": self.format,
            "n": self.n,
            "n_errors": self.n_errors,
            "errors": [asdict(e) for e in self.errors],
            "warnings": [asdict(w) for w in self.warnings],
            "stats": self.stats,
            "error": self.openai_error(),
        }

    def render(self, console: Any) -> None:
        """Print the report with rich: summary, problems by line, statistics."""
        console.print(
            f"[bold]{self.path}[/]: {self.n} example(s), format [cyan]{self.format}[/], "
            f"checked for [cyan]{self.method}[/] (data kind {self.kind})"
        )
        for title, items, style, total in (
            ("Errors", self.errors, "red", self.n_errors),
            ("Warnings", self.warnings, "yellow", len(self.warnings)),
        ):
            if not items:
                continue
            shown = f" (first {len(items)} of {total})" if total > len(items) else ""
            table = Table(title=f"{title}{shown}", title_style=f"bold {style}", title_justify="left")
            for col in ("line", "field", "code", "message"):
                table.add_column(
                    col,
                    style=style if col == "code" else None,
                    no_wrap=col != "message",
                    overflow="fold" if col == "message" else "ellipsis",
                )
            for it in items:
                table.add_row(str(it.line or ""), escape(it.field or ""), it.code, escape(it.message))
            console.print(table)
        if self.stats:
            table = Table(title="Statistics", title_justify="left", show_header=False)
            table.add_column("stat")
            table.add_column("value", justify="right")
            for key, value in self.stats.items():
                if isinstance(value, dict):
                    value = "  ".join(f"{k}={_fmt(v)}" for k, v in value.items())
                table.add_row(key.replace("_", " "), _fmt(value))
            console.print(table)
        if "tokens" not in self.stats and self.n_errors == 0:
            console.print("[dim]Token lengths and truncation are counted with a tokenizer (--model M).[/]")
        if self.ok:
            console.print(f"[bold green]OK[/]: {self.n} examples ready for {self.method}.")
        else:
            first = (self.openai_error() or {}).get("message")
            console.print(f"[bold red]Invalid[/]: {self.n_errors} error(s). {escape(str(first))}")


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def validate_file(
    path: str | Path,
    method: str = "supervised",
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    kind: str | None = None,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """Check `path` for training with `method`: OpenAI's supervised/dpo/reinforcement, or a Tunery
    objective whose data kind the caller passes as `kind`. With a tokenizer and `max_length`, also
    token-length statistics and truncation counts."""
    checked_kind, _ = kind_for_method(method, kind)
    line_errors: list[DataError] = []
    try:
        records = read_records(path, on_error=line_errors.append)
    except DataError as err:
        report = ValidationReport(str(path), method, checked_kind)
        report.add_error(Issue.from_error(err))
        return report
    return validate_records(
        records, method, line_errors, tokenizer, max_length, kind=kind, min_examples=min_examples
    )


def validate_records(
    records: Records,
    method: str,
    line_errors: list[DataError],
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    kind: str | None = None,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """`validate_file` on records already read (with `line_errors`, the lines the reader refused):
    a caller that needs the records for something else reads the file once, not twice."""
    kind, accept = kind_for_method(method, kind)
    report = ValidationReport(records.path, method, kind)
    report.n = len(records) + len(line_errors)
    try:
        dataset = convert_records(records, kind, accept=accept, on_error=line_errors.append)
    except DataError as err:  # the file as a whole is of the wrong kind
        report.format = _first_format(records)
        report.add_error(Issue.from_error(err))
        return report
    for line_error in sorted(line_errors, key=lambda e: e.line or 0):
        report.add_error(Issue.from_error(line_error))
    report.format = dataset.format
    if report.n < min_examples:
        report.add_error(
            Issue(
                None,
                None,
                "invalid_n_examples",
                f"Training file has {report.n} example(s), but must have at least {min_examples} examples",
            )
        )
    report.stats["examples"] = report.n
    report.stats["valid_examples"] = len({x.line for x in dataset.examples})
    _check_duplicates(report, records.records)
    _check_content(report, dataset.examples, records.records, kind)
    if tokenizer is not None and max_length is not None and dataset.examples:
        _token_stats(report, dataset.examples, tokenizer, max_length, kind)
    return report


def _first_format(records: Any) -> str:
    for _, rec in records.records:
        fmt = detect_format(rec)
        if fmt:
            return fmt
    return "unknown"


def _check_duplicates(report: ValidationReport, records: list[tuple[int, Any]]) -> None:
    seen: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for line, rec in records:
        key = hashlib.sha256(
            json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode()
        ).hexdigest()
        if key in seen:
            pairs.append((line, seen[key]))
        else:
            seen[key] = line
    report.stats["duplicates"] = len(pairs)
    if pairs:
        shown = ", ".join(f"line {a} repeats line {b}" for a, b in pairs[:5])
        report.warnings.append(
            Issue(
                pairs[0][0],
                None,
                "duplicate_examples",
                f"{len(pairs)} example(s) repeat an earlier one ({shown}"
                f"{', ...' if len(pairs) > 5 else ''}).",
            )
        )


def _check_content(
    report: ValidationReport, examples: list[Any], records: list[tuple[int, Any]], kind: str
) -> None:
    """Warnings: conversions the user may not expect, and examples that train nothing."""
    natives = {FORMAT_KIND.get(f) for f in (report.format,) if f in FORMAT_KIND}
    if kind == "chat" and "preference" in natives:
        report.warnings.append(
            Issue(
                None,
                None,
                "converted",
                "Preference pairs used for supervised "
                "training: only the chosen (preferred) reply is trained.",
            )
        )
    if kind == "text" and "chat" in natives:
        report.warnings.append(
            Issue(
                None,
                None,
                "converted",
                "Chat data used as plain text: conversations are rendered as ChatML text.",
            )
        )
    if kind == "chat":
        silent = [
            c.line
            for c in examples
            if isinstance(c, Conversation)
            and all(m.get("weight", 1) == 0 for m in c.messages if m["role"] == "assistant")
        ]
        if silent:
            report.warnings.append(
                Issue(
                    silent[0],
                    None,
                    "no_trained_messages",
                    f"{len(silent)} example(s) have weight 0 on every assistant message and train nothing.",
                )
            )
        report.stats["assistant_messages"] = sum(
            1 for c in examples for m in c.messages if m["role"] == "assistant"
        )


def _percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


def _length(example: Any, tokenizer: Any, kind: str) -> tuple[int, int]:
    """(total tokens, trained tokens) of one example, without truncation."""
    if isinstance(example, Conversation):
        if kind == "prompt":  # RL data: the prompt with its generation header; the model writes the rest
            return len(enc.encode_prompt(example.messages, tokenizer, example.tools)), 0
        f = enc.encode_chat(example, tokenizer, None)
        return len(f["input_ids"]), sum(1 for t in f["labels"] if t != enc.IGNORE_INDEX)
    if isinstance(example, PreferencePair):
        f = enc.encode_pair(example, tokenizer, None)
        n = len(f["chosen_ids"]) + len(f["rejected_ids"])
        return len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])), n
    if isinstance(example, Unpaired):
        f = enc.encode_completion(example.prompt, example.completion, tokenizer, None)
        return len(f["prompt_ids"]) + len(f["completion_ids"]), len(f["completion_ids"])
    if isinstance(example, Text):
        n = len(enc.encode_text(example.text, tokenizer))
        return n, n
    if isinstance(example, Labeled):
        return len(enc._ids(tokenizer(example.text, add_special_tokens=True))), 1
    raise TypeError(f"unknown example type {type(example).__name__}")


def _token_stats(
    report: ValidationReport, examples: list[Any], tokenizer: Any, max_length: int, kind: str
) -> None:
    lengths: list[int] = []
    trained = 0
    over: list[int] = []
    for ex in examples:
        try:
            n, t = _length(ex, tokenizer, kind)
        except DataError as err:
            report.add_error(Issue.from_error(err))
            continue
        lengths.append(n)
        trained += t
        if n > max_length:
            over.append(ex.line)
    if not lengths:
        return
    ordered = sorted(lengths)
    report.stats["tokens"] = {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": _percentile(ordered, 0.5),
        "p95": _percentile(ordered, 0.95),
        "max": ordered[-1],
    }
    report.stats["total_tokens"] = sum(ordered)
    report.stats["trained_tokens"] = trained
    report.stats["max_length"] = max_length
    report.stats["truncated"] = len(over)
    if over:
        lines = ", ".join(map(str, over[:10])) + (", ..." if len(over) > 10 else "")
        report.warnings.append(
            Issue(
                over[0],
                None,
                "examples_truncated",
                f"{len(over)} example(s) are longer than max_length={max_length} tokens "
                f"and will be truncated (lines {lines}).",
            )
        )
