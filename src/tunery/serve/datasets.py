"""`POST /v1/tunery/datasets`: a `fine-tune` file built from the caller's stored chat completions.

The body selects logs as `tunery data from-logs` does (`model`, `metadata`, `since`, `until`,
`rating`, `shape`, `test_fraction`); only the calling key's completions are read. The train rows
become one file object and the test slice (the most recent examples) a second; the response is the
train file object with a `tunery` field: the build report and the test file object, if any. Both
files count against the key's file and storage quotas, like uploads.

`relabel` rewrites the train replies no reviewer wrote with a stronger model (`workflows/relabel.py`):
`{"model": NAME}` names one the key may call (builtin, registered with `tunery models add`, its own
`ft:` model or alias), run by the server's engine; `{"endpoint": NAME, "model_name": M}` names a
judge/teacher endpoint the operator registered (`tunery serve --judge NAME=URL`). `judge` with a
`min_score` then drops the rewrites the judge of `tunery data judge` scores below it. Requests
never carry URLs or key variables, as in job option blocks (serve/resolver.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool

from tunery.data import from_logs
from tunery.data.from_logs import check_options, parse_time
from tunery.jobs.store import Store
from tunery.jobs.tables import new_id
from tunery.objectives.judge import Judge, JudgeOptions
from tunery.serve.bounds import heavy_slot
from tunery.serve.common import MIB, ApiError, Principal, principal
from tunery.serve.completions_store import Query
from tunery.serve.engines import serving_engine
from tunery.serve.files import file_object
from tunery.serve.resolver import get_resolver, model_not_found, resolve_model_name
from tunery.serve.stored import check_metadata, completion_log
from tunery.workflows import relabel

router = APIRouter(prefix="/v1")

MAX_DATASET_ROWS = 100_000  # stored completions one request reads into memory
FIELDS = {"model", "metadata", "since", "until", "rating", "shape", "test_fraction", "relabel", "judge"}
RELABEL_FIELDS = {"model", "endpoint", "model_name", "max_tokens"}
JUDGE_FIELDS = {"model", "endpoint", "model_name", "template", "max_score", "max_tokens", "min_score"}
MAX_RELABEL_TOKENS = 2048


def _selection(body: dict[str, Any], owner: str) -> tuple[Query, str, str, float]:
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


def _block(body: dict[str, Any], name: str, fields: set[str]) -> dict[str, Any] | None:
    """The `relabel` or `judge` object of the body (a bare string is `{"model": it}`), checked."""
    block = body.get(name)
    if block is None:
        return None
    if isinstance(block, str):
        block = {"model": block}
    if not isinstance(block, dict):
        raise ApiError(400, f"Invalid type for '{name}': expected an object.", param=name)
    unknown = sorted(set(block) - fields)
    if unknown:
        raise ApiError(
            400, f"Unknown parameter(s) in '{name}': {', '.join(unknown)}.", param=f"{name}.{unknown[0]}"
        )
    if block.get("model") is not None and block.get("endpoint") is not None:
        raise ApiError(400, f"'{name}' names a model or an endpoint, not both.", param=f"{name}.endpoint")
    if block.get("endpoint") is not None and not isinstance(block.get("model_name"), str):
        raise ApiError(
            400,
            f"'{name}.endpoint' needs the endpoint's model: '{name}.model_name'.",
            param=f"{name}.model_name",
        )
    for key in ("model", "endpoint", "model_name", "template"):
        if block.get(key) is not None and not (isinstance(block[key], str) and block[key]):
            raise ApiError(
                400, f"Invalid '{name}.{key}': expected a non-empty string.", param=f"{name}.{key}"
            )
    for key, top in (("max_tokens", MAX_RELABEL_TOKENS), ("max_score", 1e6), ("min_score", 1e6)):
        value = block.get(key)
        kind = int if key == "max_tokens" else int | float
        ok = isinstance(value, kind) and not isinstance(value, bool) and 0 <= value <= top
        if value is not None and not (ok and (key == "min_score" or value > 0)):
            raise ApiError(
                400, f"Invalid '{name}.{key}': expected a number up to {top:g}.", param=f"{name}.{key}"
            )
    if name == "judge" and block.get("min_score") is None:
        raise ApiError(400, "Missing required parameter: 'judge.min_score'.", param="judge.min_score")
    return block


def _model(request: Request, who: Principal, name: str, param: str) -> tuple[str, str | None]:
    """(base spec, absolute model dir or None) of a model the key may call, as a chat request names it."""
    try:
        base, rel = resolve_model_name(request, who, name)
    except ApiError as exc:
        raise model_not_found(name, param) if exc.status == 404 else exc from None
    return base, str(request.app.state.store.path(rel)) if rel else None


def _endpoint(request: Request, name: str, param: str) -> tuple[str, str | None]:
    return get_resolver(request).endpoint(name, param)


def _relabeler(request: Request, who: Principal, block: dict[str, Any]) -> Any:
    """`reply(conversations) -> replies` of the `relabel` block."""
    max_tokens = int(block.get("max_tokens") or 256)
    if block.get("endpoint"):
        url, key_env = _endpoint(request, block["endpoint"], "relabel.endpoint")
        return relabel.endpoint_reply(url, block["model_name"], relabel.env_key(key_env), max_tokens)
    base, adapter = _model(request, who, str(block.get("model") or ""), "relabel.model")
    # Called here rather than declared with Depends on the handler: only a relabel by a served model
    # needs the engine, and making it loads model code that a plain dataset export never pays for.
    return relabel.engine_reply(serving_engine(request), base, adapter, max_tokens)


def _judge(request: Request, who: Principal, block: dict[str, Any], relabel_block: dict[str, Any]) -> Any:
    """The `Judge` of the `judge` block; with neither `model` nor `endpoint`, the relabeler itself."""
    if not (block.get("model") or block.get("endpoint")):
        block = {**block, **{k: relabel_block.get(k) for k in ("model", "endpoint", "model_name")}}
    common: dict[str, Any] = {k: block[k] for k in ("max_score", "max_tokens") if block.get(k) is not None}
    relabel.check_min_score(block["min_score"], common.get("max_score", 10.0), "judge.min_score")
    if block.get("template"):
        where, path = get_resolver(request).file(who, block["template"], "judge.template")
        common["template"] = str(request.app.state.store.path(path)) if where == "data" else path
    if block.get("endpoint"):
        url, key_env = _endpoint(request, block["endpoint"], "judge.endpoint")
        return Judge(
            JudgeOptions(base_url=url, model_name=block["model_name"], api_key_env=key_env, **common)
        )
    base, adapter = _model(request, who, block["model"], "judge.model")
    options = JudgeOptions(model=base, adapter=adapter, **common)
    engine = serving_engine(request)  # as in _relabeler: only a judging model needs it
    return Judge(options, generate=relabel.engine_judge_generate(engine, base, adapter, options.max_tokens))


def _rewrite(built: Any, reply: Any, judge: Any, min_score: float | None) -> None:
    rows = from_logs.relabel(built, reply)
    if judge is not None and min_score is not None:  # _check_block requires min_score with a judge
        from_logs.judge_relabeled(built, rows, judge.score, min_score, judge.options.max_score)


@router.post("/tunery/datasets", summary="Build a fine-tune file from stored chat completions")
async def create_dataset(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    store: Store = request.app.state.store
    # A TuneryError here (a bad option, too many rows) is a 400 in OpenAI's shape (app.py).
    query, shape, rating, fraction = _selection(body, who.id)
    relabel_block, judge_block = _block(body, "relabel", RELABEL_FIELDS), _block(body, "judge", JUDGE_FIELDS)
    if judge_block is not None and relabel_block is None:
        raise ApiError(400, "'judge' filters relabeled replies; it needs 'relabel'.", param="judge")
    if relabel_block is not None and shape != "sft":
        raise ApiError(400, "'relabel' applies to shape sft only.", param="relabel")
    if relabel_block is not None and not (relabel_block.get("model") or relabel_block.get("endpoint")):
        raise ApiError(400, "Missing required parameter: 'relabel.model'.", param="relabel.model")

    def build() -> Any:
        store.delete_expired_files()  # they no longer count against the quotas
        records = completion_log(request.app.state).records(query, MAX_DATASET_ROWS)
        built = from_logs.build(records, shape, rating, fraction)
        if relabel_block is not None and built.train:
            reply = _relabeler(request, who, relabel_block)
            judge = _judge(request, who, judge_block, relabel_block) if judge_block else None
            _rewrite(built, reply, judge, (judge_block or {}).get("min_score"))
        return records, built

    if relabel_block is None:
        records, built = await run_in_threadpool(build)
    else:
        with heavy_slot(request, who, "a relabeling"):
            records, built = await run_in_threadpool(build)
    return await run_in_threadpool(_store_files, request, who, records, built)


def _store_files(request: Request, who: Principal, records: list, built: Any) -> dict[str, Any]:
    """The built rows as the key's two file objects (train, and the test slice if any)."""
    store: Store = request.app.state.store
    shape = built.report.shape
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
