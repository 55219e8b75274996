"""`/v1/models`: base aliases plus the key's fine-tuned models and checkpoints; delete fine-tuned only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.resolver import chat_aliases, model_not_found

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


@router.get("/models")
def list_models(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    bases = [_model(name, 0, "tunery") for name in chat_aliases()]
    return {"object": "list", "data": bases + _owned(request, who)}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    if model_id in chat_aliases():
        return _model(model_id, 0, "tunery")
    for m in _owned(request, who):
        if m["id"] == model_id:
            return m
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
