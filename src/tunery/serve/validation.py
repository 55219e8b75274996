"""Training-file checks for the API: `tunery.data.validate_file` (the same checks as
`tunery data validate`), reported in OpenAI's codes and wording."""

from __future__ import annotations

from pathlib import Path

from tunery.data import validate_file
from tunery.data.formats import native_kind
from tunery.data.readers import read_records
from tunery.data.validate import MIN_EXAMPLES, Issue, ValidationReport, validate_records
from tunery.errors import DataError
from tunery.objectives import validation_kind

# For an upload, which method to check a file against, by the kind of its first example.
_METHOD_FOR_KIND = {
    "chat": "supervised",
    "preference": "dpo",
    "unpaired": "kto",
    "text": "pretrain",
    "labeled": "classify",
    "prompt": "grpo",
}


def _first_error(path: Path, filename: str, method: str, min_examples: int) -> dict[str, str] | None:
    report = validate_file(path, method=method, kind=validation_kind(method), min_examples=min_examples)
    return _openai_error(report, path, filename)


def _openai_error(report: ValidationReport, path: Path, filename: str) -> dict[str, str] | None:
    err = report.openai_error()
    if err is None:
        return None
    # Messages may name the stored path (files/file-…); the user knows the file by its uploaded name.
    return {"code": err["code"], "message": err["message"].replace(str(path), filename)}


def upload_error(path: Path, filename: str) -> dict[str, str] | None:
    """What makes an uploaded training file unusable for any method (not JSONL, malformed lines,
    unknown roles, unknown format), or None. The example count waits for the job: a small file
    may be a validation file, and the method decides which format is right.

    The file is read once: the method to check against comes from the records already read (at
    about 0.1 s per MB, a second pass over a large upload would double the wait)."""
    line_errors: list[DataError] = []
    try:
        records = read_records(path, on_error=line_errors.append)
    except DataError as err:  # the file as a whole: empty, binary, not UTF-8
        report = ValidationReport(str(path), "supervised", "chat")
        report.add_error(Issue.from_error(err))
        return _openai_error(report, path, filename)
    first = next((rec for _, rec in records.records if isinstance(rec, dict)), None)
    kind = native_kind(first) if first is not None else None
    method = _METHOD_FOR_KIND.get(kind or "chat", "supervised")
    report = validate_records(records, method, line_errors, kind=validation_kind(method), min_examples=1)
    return _openai_error(report, path, filename)


def job_file_error(path: Path, filename: str, objective: str, param: str) -> dict[str, str] | None:
    """The first problem of a job's training or validation file for the job's objective, or None.
    Validation files may be small; training files need OpenAI's minimum of 10 examples."""
    return _first_error(path, filename, objective, MIN_EXAMPLES if param == "training_file" else 1)
