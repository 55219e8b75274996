"""`POST /v1/tunery/datasets`: a `fine-tune` file built from the caller's stored chat completions.

The body selects logs as `tunery data from-logs` does (`model`, `metadata`, `since`, `until`,
`rating`, `shape`, `test_fraction`); only the calling key's completions are read. The train rows
become one file object and the test slice (the most recent examples) a second; the response is the
train file object with a `tunery` field: the build report and the test file object, if any. Both
files count against the key's file and storage quotas, like uploads.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from tunery.jobs.store import Store, new_id
from tunery.serve.common import MIB, ApiError, Principal, principal
from tunery.serve.completions_store import Query
from tunery.serve.files import file_object
from tunery.serve.stored import check_metadata, completion_log

router = APIRouter(prefix="/v1")

MAX_DATASET_ROWS = 100_000  # stored completions one request reads into memory
FIELDS = {"model", "metadata", "since", "until", "rating", "shape", "test_fraction"}


def _selection(body: dict[str, Any], owner: str) -> tuple[Query, str, str, float]:
    from tunery.data.from_logs import check_options, parse_time

    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"Unknown parameter(s): {', '.join(unknown)}.", param=unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "Invalid type for 'model': expected a string.", param="model")
    shape, rating = body.get("shape", "sft"), body.get("rating", "rated")
    fraction = body.get("test_fraction", 0.1)
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        raise ApiError(400, "Invalid type for 'test_fraction': expected a number.", param="test_fraction")
    check_options(shape, rating, float(fraction))
    query = Query(
        owner,  # the caller's completions only, whoever the caller is
        model=model,
        metadata=check_metadata(body.get("metadata")),
        since=parse_time(body.get("since"), "since"),
        until=parse_time(body.get("until"), "until", end=True),
    )
    return query, shape, rating, float(fraction)


def _check_room(request: Request, who: Principal, files: int, size: int) -> None:
    """The key's file count and storage quotas, for `files` new files of `size` bytes in all."""
    settings, store = request.app.state.settings, request.app.state.store
    if store.count_files(who.id) + files > settings.max_files_per_key:
        raise ApiError(
            400,
            f"This key would pass the server's limit of {settings.max_files_per_key} files. "
            "Delete some first.",
            code="files_limit_exceeded",
        )
    limit = settings.max_storage_mb_per_key * MIB
    used = store.storage_bytes(who.id)
    if limit > 0 and used + size > limit:
        raise ApiError(
            429,
            f"This key stores {used / MIB:.1f} MB of files; this dataset ({size / MIB:.1f} MB) would pass "
            f"the server's limit of {settings.max_storage_mb_per_key} MB per key. Delete some files first.",
            code="storage_limit_exceeded",
            type="rate_limit_error",
        )


@router.post("/tunery/datasets", summary="Build a fine-tune file from stored chat completions")
def create_dataset(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    from tunery.data import from_logs

    store: Store = request.app.state.store
    store.delete_expired_files()  # they no longer count against the quotas
    # A TuneryError here (a bad option, too many rows) is a 400 in OpenAI's shape (app.py).
    query, shape, rating, fraction = _selection(body, who.id)
    records = completion_log(request.app.state).records(query, MAX_DATASET_ROWS)
    built = from_logs.build(records, shape, rating, fraction)
    report = built.report.to_dict()
    if not built.train:
        raise ApiError(
            400,
            "No examples to build a dataset from: "
            + (
                "none of this key's stored completions match the selection."
                if not records
                else f"every selected completion was dropped ({from_logs.reasons(built.report)})."
            ),
            code="empty_dataset",
        )
    folder = store.data_dir / "files" / ".tmp"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / f"{new_id('dataset-')}.jsonl", "test": folder / f"{new_id('dataset-')}.jsonl"}
    try:
        from_logs.write_validated(built.train, paths["train"], shape)
        if built.test:
            from_logs.write_validated(built.test, paths["test"], shape)
        made = [p for p in paths.values() if p.exists()]
        _check_room(request, who, len(made), sum(p.stat().st_size for p in made))
        name = f"from-logs-{shape}"
        train = store.adopt_file(who.id, f"{name}.jsonl", "fine-tune", paths["train"])
        test = (
            store.adopt_file(who.id, f"{name}.test.jsonl", "fine-tune", paths["test"]) if built.test else None
        )
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    return {
        **file_object(train),
        "tunery": {"report": report, "test_file": file_object(test) if test is not None else None},
    }
