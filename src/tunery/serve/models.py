"""`/v1/models`: base aliases plus the key's fine-tuned models and checkpoints; delete fine-tuned only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tunery.errors import TuneryError
from tunery.redact import scrub_paths
from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.resolver import chat_aliases, model_not_found, resolve_model_name

router = APIRouter(prefix="/v1")


def _model(id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": id, "object": "model", "created": created, "owned_by": owned_by}


def _owned(request: Request, who: Principal) -> list[dict[str, Any]]:
    store = request.app.state.store
    out = [_model(m.name, m.created_at, who.name) for m in store.list_models(who.id)]
    names = {m["id"] for m in out}
    for c in store.owner_checkpoints(who.id):
        if c.model_name not in names and store.path(c.path).exists():
            names.add(c.model_name)
            out.append(_model(c.model_name, c.created_at, who.name))
    return out


def _with_engine(request: Request, who: Principal, model: dict[str, Any]) -> dict[str, Any]:
    """The model entry plus Tunery's `tunery.engine`: which serving engine answers for it, and why
    not llama.cpp where it is not (serve/engines). Deciding reads configs only; a model that cannot be
    resolved now says null."""
    from tunery.serve.app import get_engine

    engine, why = None, None
    try:
        spec, rel = resolve_model_name(request, who, model["id"])
        adapter = str(request.app.state.store.path(rel)) if rel else None
        engine, why = get_engine(request.app.state).engine_name(spec, adapter)
    except TuneryError as exc:
        why = scrub_paths(exc.message)
    return {**model, "tunery": {"engine": engine, "reason": why}}


@router.get("/models")
def list_models(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    bases = [_model(name, 0, "tunery") for name in chat_aliases()]
    data = [_with_engine(request, who, m) for m in bases + _owned(request, who)]
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    if model_id in chat_aliases():
        return _with_engine(request, who, _model(model_id, 0, "tunery"))
    for m in _owned(request, who):
        if m["id"] == model_id:
            return _with_engine(request, who, m)
    raise model_not_found(model_id)


@router.delete("/models/{model_id:path}")
def delete_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    if model_id in chat_aliases():
        raise ApiError(
            403,
            f"The base model `{model_id}` cannot be deleted; only fine-tuned models can.",
            code="model_not_deletable",
            param="model",
            type="invalid_request_error",
        )
    request.app.state.store.delete_model(who.id, model_id)
    return {"id": model_id, "object": "model", "deleted": True}
