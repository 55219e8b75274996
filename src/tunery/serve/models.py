"""`/v1/models`: builtin and registered base models plus the key's fine-tuned models and checkpoints;
delete fine-tuned only. `/v1/tunery/models`: the model registry, for admin keys (serve/model_registry.py).

- `GET /v1/tunery/models`, `GET /v1/tunery/models/{name}`: the registered models, with their source,
  sha256, license, architecture, parameters and context length.
- `POST /v1/tunery/models` with `{"name": …, "source": …}`: register a model on the server's disk
  (an absolute path to a Hugging Face directory or a .gguf file) or in its Hugging Face cache (a hub
  id); the files are checked and hashed first.
- `DELETE /v1/tunery/models/{name}`: forget it (its files stay where they are).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from tunery.errors import TuneryError
from tunery.models.registry import is_hub_id
from tunery.redact import scrub_paths
from tunery.serve.common import ApiError, Principal, admin, principal
from tunery.serve.engines import get_engine
from tunery.serve.model_registry import ModelRegistry, model_object
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
    engine, why = None, None
    try:
        spec, rel = resolve_model_name(request, who, model["id"])
        adapter = str(request.app.state.store.path(rel)) if rel else None
        engine, why = get_engine(request.app.state).engine_name(spec, adapter, cheap=True)
    except TuneryError as exc:
        why = scrub_paths(exc.message)
    return {**model, "tunery": {"engine": engine, "reason": why}}


def _bases(request: Request) -> list[dict[str, Any]]:
    """The base models every key may use: the builtin chat models, then the registered ones."""
    out = [_model(name, 0, "tunery") for name in chat_aliases()]
    rows = ModelRegistry(request.app.state.store).list()
    return out + [_model(r.name, r.added_at, "tunery") for r in rows if r.name not in chat_aliases()]


@router.get("/models")
def list_models(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    data = [_with_engine(request, who, m) for m in _bases(request) + _owned(request, who)]
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    for m in _bases(request) + _owned(request, who):
        if m["id"] == model_id:
            return _with_engine(request, who, m)
    raise model_not_found(model_id)


@router.delete("/models/{model_id:path}")
def delete_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    if any(m["id"] == model_id for m in _bases(request)):
        raise ApiError(
            403,
            f"The base model `{model_id}` cannot be deleted; only fine-tuned models can. The operator "
            "removes a registered model with `tunery models rm` or DELETE /v1/tunery/models/{name}.",
            code="model_not_deletable",
            param="model",
            type="invalid_request_error",
        )
    request.app.state.store.delete_model(who.id, model_id)
    return {"id": model_id, "object": "model", "deleted": True}


@router.get("/tunery/models", summary="List the registered models (admin)")
def list_registered(request: Request, _who: Principal = Depends(admin)) -> dict[str, Any]:
    rows = ModelRegistry(request.app.state.store).list()
    return {"object": "list", "data": [model_object(r) for r in rows]}


@router.get("/tunery/models/{name}", summary="Retrieve a registered model (admin)")
def retrieve_registered(name: str, request: Request, _who: Principal = Depends(admin)) -> dict[str, Any]:
    return model_object(ModelRegistry(request.app.state.store).get(name))


@router.post("/tunery/models", summary="Register a model by name (admin)")
def register_model(
    request: Request, body: dict[str, Any] = Body(...), _who: Principal = Depends(admin)
) -> dict[str, Any]:
    for field in ("name", "source"):
        if not isinstance(body.get(field), str) or not body[field]:
            raise ApiError(400, f"Missing required parameter: '{field}' (a string).", param=field)
    source = body["source"]
    if not (source.startswith("/") or is_hub_id(source)):
        raise ApiError(
            400,
            "A source is an absolute path on the server or a hub id (org/name) in its Hugging Face cache.",
            code="invalid_source",
            param="source",
        )
    try:
        row = ModelRegistry(request.app.state.store).register(body["name"], source)
    except TuneryError as exc:
        if exc.status == 409 or exc.param == "name":
            raise
        # A source that is not a usable model is a bad request, not a missing URL.
        hint = f" Hint: {exc.hint}" if exc.hint else ""
        raise ApiError(400, exc.message + hint, code=exc.code, param="source") from None
    return model_object(row)


@router.delete("/tunery/models/{name}", summary="Forget a registered model (admin; its files stay)")
def delete_registered(name: str, request: Request, _who: Principal = Depends(admin)) -> dict[str, Any]:
    ModelRegistry(request.app.state.store).remove(name)
    return {"id": name, "object": "tunery.registered_model.deleted", "deleted": True}
