"""Training-file checks for the API: `tunery.data.validate_file` (the same checks as
`tunery data validate`), reported in OpenAI's codes and wording."""

from __future__ import annotations

from pathlib import Path

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
    from tunery.data import validate_file

    report = validate_file(path, method=method, min_examples=min_examples)
    err = report.openai_error()
    if err is None:
        return None
    # Messages may name the stored path (files/file-…); the user knows the file by its uploaded name.
    return {"code": err["code"], "message": err["message"].replace(str(path), filename)}


def upload_error(path: Path, filename: str) -> dict[str, str] | None:
    """What makes an uploaded training file unusable for any method (not JSONL, malformed lines,
    unknown roles, unknown format), or None. The example count waits for the job: a small file
    may be a validation file, and the method decides which format is right."""
    from tunery.data.formats import native_kind
    from tunery.data.readers import read_records
    from tunery.errors import DataError

    try:
        records = read_records(path, on_error=lambda _e: None)
    except DataError:
        records = None
    first = next((rec for _, rec in (records.records if records else []) if isinstance(rec, dict)), None)
    kind = native_kind(first) if first is not None else None
    return _first_error(path, filename, _METHOD_FOR_KIND.get(kind or "chat", "supervised"), min_examples=1)


def job_file_error(path: Path, filename: str, objective: str, param: str) -> dict[str, str] | None:
    """The first problem of a job's training or validation file for the job's objective, or None.
    Validation files may be small; training files need OpenAI's minimum of 10 examples."""
    from tunery.data.validate import MIN_EXAMPLES

    return _first_error(path, filename, objective, MIN_EXAMPLES if param == "training_file" else 1)
