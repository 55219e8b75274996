"""The web dashboard: `/` serves the single-page UI, `/ui/...` its static files, and `/v1/tunery/...`
holds the few JSON endpoints the UI needs that OpenAI's API lacks (registries, a validation report
with line numbers, a memory/time estimate, evaluation on the server's models, model export).

The UI itself is plain ES modules under `tunery/ui/static` (no build step) and talks to the same API
with the same keys as any other client.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from tunery.config import Hyperparameters, check_request_hyperparameters
from tunery.data import validate_file
from tunery.errors import DataError
from tunery.evaluate.heldout import Contender, compare_on_heldout, load_heldout, sample
from tunery.evaluate.run import compare, load_conversations
from tunery.export import export
from tunery.jobs.spec import invalid_setting
from tunery.jobs.tables import new_id
from tunery.methods import METHODS, load_trained
from tunery.objectives import OBJECTIVES, validation_kind
from tunery.serve.bounds import check_eval_size, check_model_size, export_workdir, heavy_slot
from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.engines import get_engine
from tunery.serve.resolver import chat_aliases, resolve_model_name
from tunery.serve.ui_estimate import estimate_job

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
router = APIRouter()
api = APIRouter(prefix="/v1/tunery", tags=["tunery dashboard"])

# One-line explanations of OpenAI's hyperparameters for the New-job form (the Tunery ones come
# from the config's field descriptions).
OPENAI_HELP = {
    "n_epochs": "Passes over the training data. auto: 3, more for tiny files, fewer for huge ones.",
    "batch_size": "Examples per optimizer step. auto: 0.2% of the examples, between 1 and 256; at least 8 "
    "on a CPU from 100 examples.",
    "learning_rate_multiplier": "Scales the method's base learning rate. auto: 0.05-0.2 by batch size, "
    "scaled up with the batch where a CPU raised it.",
}


# ---------------------------------------------------------------------------------------------
# Pages and static files


@router.get("/", include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/ui/{path:path}", include_in_schema=False)
def static_file(path: str) -> FileResponse:
    target = (STATIC / path).resolve()
    # Only files inside the static folder: `..` or absolute paths get the normal 404.
    if not target.is_relative_to(STATIC) or not target.is_file():
        raise ApiError(404, f"Unknown request URL: GET /ui/{path}.", code="unknown_url")
    media = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}.get(target.suffix)
    return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------
# Registries


def _options(schema: Any) -> list[dict[str, Any]]:
    """A pydantic options model as form fields: name, type, default, description, choices."""
    out = []
    props = schema.model_json_schema().get("properties", {})
    for name, field in schema.model_fields.items():
        prop = props.get(name, {})
        kinds = [p.get("type") for p in prop.get("anyOf", [prop]) if p.get("type") not in (None, "null")]
        default = field.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):  # a nested options block (e.g. moe): its fields' defaults
            default = default.model_dump(mode="json")
        try:
            json.dumps(default)
        except TypeError:
            default = str(default)
        if not kinds and (prop.get("$ref") or prop.get("allOf")):
            kinds = ["object"]
        out.append(
            {
                "name": name,
                "type": kinds[0] if kinds else "string",
                "default": default,
                "description": field.description or "",
                "choices": prop.get("enum"),
            }
        )
    return out


@api.get("/registry", summary="Methods, objectives, hyperparameters and base models for the New-job form")
def registry(who: Principal = Depends(principal)) -> dict[str, Any]:
    methods = [
        {
            "name": name,
            "description": m.description,
            "scale": m.scale,
            "can_merge": m.can_merge,
            "options": _options(m.options),
        }
        for name, m in METHODS.items()
    ]
    objectives = [
        {
            "name": name,
            "description": o.description,
            "data_kind": o.data_kind,
            "options": _options(o.options),
        }
        for name, o in OBJECTIVES.items()
    ]
    hp = []
    for field in _options(Hyperparameters):
        if field["name"] in OPENAI_HELP:
            field.update(openai=True, description=OPENAI_HELP[field["name"]])
        else:
            field["openai"] = False
        hp.append(field)
    models = [{"id": name, "description": a.description} for name, a in chat_aliases().items()]
    return {"methods": methods, "objectives": objectives, "hyperparameters": hp, "base_models": models}


# ---------------------------------------------------------------------------------------------
# Validation report


def _report(path: Path, filename: str, method: str, min_examples: int, tokenizer: Any = None) -> dict:
    report = validate_file(
        path,
        method=method,
        tokenizer=tokenizer,
        max_length=Hyperparameters.model_fields["max_length"].default,
        kind=validation_kind(method),
        min_examples=min_examples,
    ).to_dict()
    # The stored path means nothing to the user; they know the file by the name they uploaded.
    text = json.dumps(report).replace(json.dumps(str(path))[1:-1], filename)
    out = json.loads(text)
    out["path"] = filename
    return out


def _method_arg(method: str) -> str:
    validation_kind(method)  # a ConfigError naming the known ones when unknown
    return method


@api.post(
    "/validate",
    summary="Validate a data file before uploading it (the checks of `tunery data validate`)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def validate_upload(
    request: Request,
    filename: str = "upload.jsonl",
    method: str = "sft",
    min_examples: int = 10,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    """The raw file is the request body; the report lists every problem with its line and field."""
    method = _method_arg(method)
    name = filename.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.jsonl"
    tmp_dir = request.app.state.store.data_dir / "files" / ".tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: the reader picks JSONL / CSV / Parquet by it.
    tmp = tmp_dir / (new_id("validate-") + Path(name).suffix.lower())
    try:
        with open(tmp, "wb") as fh:
            async for chunk in request.stream():
                fh.write(chunk)
        return await run_in_threadpool(_report, tmp, name, method, max(0, min_examples))
    finally:
        tmp.unlink(missing_ok=True)


@api.get("/files/{file_id}/validate", summary="Validation report of an uploaded file")
def validate_uploaded(
    file_id: str,
    request: Request,
    method: str = "sft",
    min_examples: int = 10,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    store = request.app.state.store
    row = store.get_file(who.id, file_id)
    return _report(store.path(row.path), row.filename, _method_arg(method), max(0, min_examples))


# ---------------------------------------------------------------------------------------------
# Memory and time estimate


@api.post("/estimate", summary="Rough memory and time estimate of a fine-tuning job")
def estimate(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    """Body: {model, method, objective?, training_file?, n_examples?, tokens_per_example?,
    hyperparameters?: {n_epochs, batch_size, max_length, micro_batch_tokens}, options?: {...}}."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    base_spec, adapter = resolve_model_name(request, who, model)
    data_path = None
    if body.get("training_file"):
        store = request.app.state.store
        data_path = store.path(store.get_file(who.id, str(body["training_file"])).path)
    return estimate_job(base_spec, data_path=data_path, **_estimate_args(body))


def _estimate_args(body: dict[str, Any]) -> dict[str, Any]:
    """The estimate's numbers, checked like a job's: a wrong type is a 400 naming it, not a 500."""

    def number(name: str, integer: bool, hi: float) -> Any:
        value = body.get(name)
        ok = isinstance(value, int if integer else int | float) and not isinstance(value, bool)
        if value is not None and not (ok and 0 < value <= hi):
            kind = "a positive integer" if integer else "a positive number"
            raise ApiError(400, f"Invalid {name} {value!r}: expected {kind} up to {hi:g}.", param=name)
        return value

    hp, options = body.get("hyperparameters") or {}, body.get("options") or {}
    if not isinstance(hp, dict):
        raise ApiError(400, "hyperparameters must be an object.", param="hyperparameters")
    r = options.get("r") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not (r is None or type(r) is int and 1 <= r <= 4096):
        raise ApiError(400, 'options must be the method\'s options, like {"r": 8}.', param="options")
    return {
        "method": str(body.get("method") or "lora"),
        "objective": str(body.get("objective") or "sft"),
        "n_examples": number("n_examples", True, 1e9),
        "tokens_per_example": number("tokens_per_example", False, 1e7),
        "hyperparameters": _checked_hyperparameters(hp),
        "options": options,
    }


def _checked_hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """The estimate's hyperparameters: in a job's ranges, and each known name of a type a job takes
    (`auto_rule` one of its names), so what the estimate assumes is what a job would run."""
    hp = check_request_hyperparameters(hp, "hyperparameters")
    known = {name: value for name, value in hp.items() if name in Hyperparameters.model_fields}
    try:
        Hyperparameters.model_validate(known)
    except ValidationError as exc:
        raise invalid_setting(exc, "hyperparameters") from None
    return hp


# ---------------------------------------------------------------------------------------------
# Evaluate / compare on the server's models


def _run_eval(
    rows: list[tuple[str, str, str | None]], data: Path, max_new_tokens: int | None, max_params: int
) -> dict:
    convs = load_conversations(data)  # read once: counted here, evaluated below
    check_eval_size(len(convs), max_new_tokens)
    check_model_size([(base, Path(a) if a else None) for _, base, a in rows], max_params, "models")
    loaded = []
    for label, base, adapter in rows:
        model, tok = load_trained(base, adapter)
        loaded.append((label, model, tok, None))
    result = compare(loaded, convs, max_new_tokens=max_new_tokens, progress=False, batch_size=8)
    for row in result["rows"]:
        row.pop("predictions", None)  # one per example: the disagreements carry what the UI shows
    return result


def _data_file_and_length(store: Any, who: Principal, body: dict[str, Any]) -> tuple[Any, int | None]:
    """The key's data file an evaluation names (`file`) and its `max_new_tokens`, both checked."""
    file_id = body.get("file")
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, "Missing required parameter: 'file'.", param="file")
    row = store.get_file(who.id, file_id)
    max_new = body.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise ApiError(400, "max_new_tokens must be a positive integer.", param="max_new_tokens")
    check_eval_size(0, max_new)
    return row, max_new


@api.post("/evaluate", summary="Evaluate and compare models on an uploaded test file")
async def evaluate_models(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    """Body: {file: file id (chat examples, the last assistant message is the reference),
    models: [model names], max_new_tokens?}. Returns {rows: [{label, metrics...}], disagreements}."""
    store = request.app.state.store
    names = body.get("models")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ApiError(400, "models must be a non-empty list of model names.", param="models")
    if len(names) > 4:
        raise ApiError(400, "Compare at most 4 models at once.", param="models")
    row, max_new = _data_file_and_length(store, who, body)
    rows = []
    for name in dict.fromkeys(names):
        base, rel = resolve_model_name(request, who, name)
        rows.append((name, base, str(store.path(rel)) if rel else None))
    limit = request.app.state.settings.max_eval_export_params
    with heavy_slot(request, who, "an evaluation"):
        return await run_in_threadpool(_run_eval, rows, store.path(row.path), max_new, limit)


def _compare_heldout(
    engine: Any, rows: list[Any], data: Path, filename: str, body: dict, progress: dict[str, Any]
) -> dict:
    try:
        examples, skipped = load_heldout(data)
    except DataError as exc:  # it names the stored file; the caller knows it by its upload name
        raise DataError(exc.message.replace(str(data), filename), exc.hint, param="file") from None
    total = len(examples)
    examples = sample(examples, body.get("sample"))
    check_eval_size(len(examples), body.get("max_new_tokens"))
    progress.update(done=0, total=len(examples) * len(rows))
    result = compare_on_heldout(
        engine,
        rows,
        examples,
        max_new_tokens=body.get("max_new_tokens"),
        on_progress=lambda done, _total: progress.update(done=done),
    )
    out = {**result, "skipped": skipped}
    if len(examples) < total:
        out["sampled_from"] = total
    return out


def _progress_table(request: Request) -> dict[str, dict[str, Any]]:
    """Key id -> the progress of its running comparison (one per key: its heavy slot)."""
    state = request.app.state
    table = getattr(state, "compare_progress", None)
    if table is None:  # made on first use, in the event loop
        table = state.compare_progress = {}
    return table


@api.post("/compare", summary="Old model against new on the held-out slice of the logs")
async def compare_heldout(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    """Body: {file: the test file of `POST /v1/tunery/datasets` (its `tunery.test_file`), models:
    [old, new], max_new_tokens?, sample?}. Both answer through the server's engine; the result has
    each model's exact match (classification metrics when the replies are labels), latency and
    tokens. `sample` compares on that many examples of the file (a fixed-seed sample). While it runs,
    `GET /v1/tunery/compare/progress` counts the replies made."""
    store = request.app.state.store
    names = body.get("models")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != 2:
        raise ApiError(400, "models must be two different model names: [old, new].", param="models")
    size = body.get("sample")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ApiError(400, "sample must be a positive integer.", param="sample")
    row, max_new = _data_file_and_length(store, who, body)
    rows = []
    for name in names:
        base, rel = resolve_model_name(request, who, name)
        rows.append(Contender(name, base, str(store.path(rel)) if rel else None))
    engine = get_engine(request.app.state)
    table = _progress_table(request)
    with heavy_slot(request, who, "a comparison"):
        table[who.id] = progress = {"done": 0, "total": None}
        try:
            return await run_in_threadpool(
                _compare_heldout, engine, rows, store.path(row.path), row.filename, body, progress
            )
        finally:
            table.pop(who.id, None)


@api.get("/compare/progress", summary="How far the calling key's running comparison is")
async def compare_progress(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    """`{"object": "tunery.compare.progress", "running", "done", "total"}`: replies made so far and
    to make (examples times models); `total` is null until the file is read."""
    found = _progress_table(request).get(who.id)
    done, total = (found["done"], found["total"]) if found else (0, None)
    return {"object": "tunery.compare.progress", "running": found is not None, "done": done, "total": total}


# ---------------------------------------------------------------------------------------------
# Export


EXPORT_FORMATS = ("adapter", "hf", "gguf")


@api.post(
    "/export",
    summary="Export a fine-tuned model (PEFT adapter, merged HF or GGUF) as a zip download",
    response_class=FileResponse,
)
async def export_model(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> FileResponse:
    name, fmt = body.get("model"), body.get("format", "adapter")
    if not isinstance(name, str) or not name.startswith("ft:"):
        raise ApiError(400, "Only fine-tuned models (ft:...) can be exported.", param="model")
    if fmt not in EXPORT_FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(EXPORT_FORMATS)}.", param="format")
    store = request.app.state.store
    base, rel = resolve_model_name(request, who, name)
    slug = name.replace(":", "-").strip("-")
    limit = request.app.state.settings.max_eval_export_params
    with heavy_slot(request, who, "an export"):
        await run_in_threadpool(check_model_size, [(base, store.path(rel))], limit)
        with export_workdir(store.data_dir) as work:  # removed if the export or the zip fails
            out = work / slug
            await run_in_threadpool(export, base, str(store.path(rel)), fmt, out)
            archive = await run_in_threadpool(shutil.make_archive, str(work / f"{slug}-{fmt}"), "zip", out)
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=Path(archive).name,
        background=BackgroundTask(shutil.rmtree, work, True),
    )


router.include_router(api)
