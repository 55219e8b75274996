"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events (paged or SSE)
and checkpoints."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunery.jobs import spec
from tunery.jobs.tables import ACTIVE_STATUSES, CheckpointRow, EventRow, Job, new_id, now
from tunery.serve.common import (
    ApiError,
    Principal,
    check_job_quota,
    check_limit,
    check_metadata,
    metadata_filter,
    page,
    principal,
)
from tunery.serve.resolver import get_resolver
from tunery.serve.validation import job_file_error

router = APIRouter(prefix="/v1/fine_tuning")
TERMINAL = ("succeeded", "failed", "cancelled")


def job_object(job: Job) -> dict[str, Any]:
    ext = job.tunery or {}
    hp = {k: v for k, v in (job.hyperparameters or {}).items() if k in spec.OPENAI_HPARAMS}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "model": job.model,
        "organization_id": job.owner,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "seed": job.seed,
        "result_files": list(job.result_files or []),
        "status": job.status,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "finished_at": job.finished_at,
        "trained_tokens": job.trained_tokens,
        "hyperparameters": hp,
        "error": job.error or None,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.meta,
        "method": job.method,
        "user_provided_suffix": job.suffix,
        # Tunery's extension: what actually trains.
        "tunery": {
            "method": ext.get("method"),
            "objective": ext.get("objective"),
            "options": ext.get("options") or {},
            "resources": ext.get("resources") or {},  # asked for on a Ray cluster; {} = server defaults
            **{k: ext[k] for k in spec.CLASSIFICATION_FIELDS if k in ext},
        },
    }


def event_object(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data or {},
    }


def checkpoint_object(row: CheckpointRow) -> dict[str, Any]:
    metrics = {k: v for k, v in (row.metrics or {}).items() if isinstance(v, int | float)}
    metrics.setdefault("step", row.step)
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuning_job_id": row.job_id,
        "step_number": row.step,
        "fine_tuned_model_checkpoint": row.model_name,
        "metrics": metrics,
    }


def _training_file(request: Request, who: Principal, file_id: Any, param: str):
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    try:
        row = request.app.state.store.get_file(who.id, file_id)
    except Exception:
        raise ApiError(400, f"invalid {param}: {file_id}", code=f"invalid_{param}", param=param) from None
    if row.purpose != "fine-tune":
        raise ApiError(
            400,
            f"File {file_id} has purpose {row.purpose!r}; fine-tuning needs purpose 'fine-tune'.",
            code=f"invalid_{param}",
            param=param,
        )
    return row


def _check_suffix(suffix: Any) -> str | None:
    if suffix is not None and (
        not isinstance(suffix, str) or len(suffix) > 64 or not re.fullmatch(r"[A-Za-z0-9_.-]*", suffix)
    ):
        raise ApiError(
            400, "suffix must be at most 64 characters of letters, digits, '-', '_' and '.'.", param="suffix"
        )
    return suffix


def _check_seed(seed: Any) -> int:
    if seed is None:
        return random.randint(0, 2**31 - 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1:
        raise ApiError(400, "seed must be an integer in [0, 2147483647].", param="seed")
    return seed


def _resolve_names(request: Request, who: Principal, model: str, ext: dict[str, Any]) -> str:
    """Every name in a job request (model, teachers, judges, reward models, templates) goes through the
    one resolver; what they resolve to is kept in `ext` apart from the options echoed back (resolver.py).
    Returns the base model's spec."""
    resolver = get_resolver(request)
    named = resolver.model(who, model)
    ext["base_spec"] = named.spec
    if named.adapter:
        ext["adapter"] = named.adapter  # continue training an ft: model: its dir is the starting adapter
    resolved = resolver.options(who, ext["options"])
    if resolved:
        ext["resolved"] = resolved
    return named.spec


@router.post("/jobs")
def create_job(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    state = request.app.state
    store = state.store
    check_job_quota(request, who)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    train = _training_file(request, who, body.get("training_file"), "training_file")
    valid = (
        _training_file(request, who, body["validation_file"], "validation_file")
        if body.get("validation_file")
        else None
    )
    fields = spec.parse_request(body)
    suffix = _check_suffix(body.get("suffix"))
    seed = _check_seed(body.get("seed"))
    meta = check_metadata(body.get("metadata"))
    ext = fields["tunery"]
    base_spec = _resolve_names(request, who, model, ext)
    job_id = new_id("ftjob-")
    job = Job(
        id=job_id,
        owner=who.id,
        status="validating_files",
        model=model,
        training_file=train.id,
        validation_file=valid.id if valid else None,
        hyperparameters=fields["hyperparameters"],
        method=fields["method"],
        tunery=ext,
        suffix=suffix,
        seed=seed,
        meta=meta,
        output_name=spec.model_name(base_spec, who.name, suffix),
        created_at=now(),
        run_dir=f"jobs/{job_id}",
        result_files=[],
        events_offset=0,
        attempts=0,
        resume=False,
    )
    # Settings and data are checked before the job exists, so a mistake is a 400 naming the field
    # or line at fault rather than a job that fails minutes later.
    spec.build_config(job, store.data_dir, store.path(train.path), store.path(valid.path) if valid else None)
    # OpenAI's method types check strictly (a preference file is wrong for supervised); a Tunery
    # objective accepts whatever its data kind converts from.
    mtype = fields["method"].get("type")
    check_as = mtype if spec.OBJECTIVE_FOR_TYPE.get(mtype) == ext["objective"] else ext["objective"]
    for row, param in ((train, "training_file"), (valid, "validation_file")):
        if row is not None:
            err = job_file_error(store.path(row.path), row.filename, check_as, param)
            if err is not None:
                raise ApiError(400, err["message"], code=err["code"], param=param)
    job.status = "queued"
    store.add_job(
        job,
        events=[
            ("info", f"Created fine-tuning job: {job_id}"),
            (
                "info",
                f"Validating training file: {train.id}"
                + (f" and validation file: {valid.id}" if valid else ""),
            ),
            ("info", "Files validated, moving job to queued state"),
        ],
    )
    if state.executor is not None:
        state.executor.wake()
    return job_object(job)


@router.get("/jobs")
def list_jobs(
    request: Request, after: str | None = None, limit: int = 20, who: Principal = Depends(principal)
) -> dict[str, Any]:
    check_limit(limit, 100)
    wanted = metadata_filter(request)
    jobs = request.app.state.store.list_jobs(who.id)
    if wanted:
        jobs = [j for j in jobs if all((j.meta or {}).get(k) == v for k, v in wanted.items())]
    return page([job_object(j) for j in jobs], after, limit)


@router.get("/jobs/{job_id}")
def retrieve_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    return job_object(request.app.state.store.get_job(who.id, job_id))


def _transition(
    request: Request, who: Principal, job_id: str, to: str, allowed: tuple[str, ...], verb: str, **fields: Any
) -> Job:
    store = request.app.state.store
    job = store.get_job(who.id, job_id)
    updated = store.update_job(job_id, expect=allowed, status=to, **fields)
    if updated is None:
        raise ApiError(
            400,
            f"Job {job_id} cannot be {verb}: its status is {job.status}.",
            code="invalid_job_status",
            param="fine_tuning_job_id",
        )
    return updated


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    job = _transition(
        request,
        who,
        job_id,
        "cancelled",
        ACTIVE_STATUSES + ("paused",),
        "cancelled",
        finished_at=now(),
        events=[("info", "Cancellation requested")],
    )
    if request.app.state.executor is not None:
        request.app.state.executor.cancel(job_id)
    return job_object(job)


@router.post("/jobs/{job_id}/pause")
def pause_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    job = _transition(
        request, who, job_id, "paused", ("queued", "running"), "paused", events=[("info", "Pause requested")]
    )
    if request.app.state.executor is not None:
        request.app.state.executor.pause(job_id)
    return job_object(job)


@router.post("/jobs/{job_id}/resume")
def resume_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    check_job_quota(request, who)  # a resumed job is queued again: it counts like a new one
    job = _transition(
        request,
        who,
        job_id,
        "queued",
        ("paused",),
        "resumed",
        resume=True,
        events=[("info", "Resume requested, moving job to queued state")],
    )
    if request.app.state.executor is not None:
        request.app.state.executor.wake()
    return job_object(job)


@router.get("/jobs/{job_id}/events", response_model=None)
def list_events(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: int = 20,
    stream: bool = False,
    who: Principal = Depends(principal),
) -> dict[str, Any] | StreamingResponse:
    store = request.app.state.store
    store.get_job(who.id, job_id)
    if stream:
        return StreamingResponse(
            _event_stream(request, job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    check_limit(limit, 1000)
    rows, more = store.list_events(job_id, after=after, limit=limit)
    return {"object": "list", "data": [event_object(r) for r in rows], "has_more": more}


async def _event_stream(request: Request, job_id: str):
    """All events oldest first, then new ones as they arrive, until the job stops; then [DONE]."""
    store = request.app.state.store
    seq = 0
    while True:
        rows = await run_in_threadpool(store.events_since, job_id, seq)
        for row in rows:
            seq = row.seq
            yield f"data: {json.dumps(event_object(row))}\n\n"
        if not rows:
            job = await run_in_threadpool(store.get_job, None, job_id)
            if job.status in TERMINAL + ("paused",):
                if not await run_in_threadpool(store.events_since, job_id, seq):
                    break
                continue
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)
    yield "data: [DONE]\n\n"


@router.get("/jobs/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: int = 10,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    store = request.app.state.store
    store.get_job(who.id, job_id)
    check_limit(limit, 100)
    rows = [r for r in store.list_checkpoints(job_id) if store.path(r.path).exists()]
    return page([checkpoint_object(r) for r in rows], after, limit, ids=True)
