"""`/v1/tunery/aliases`: a key's model aliases, the stable names its apps call.

- `GET /v1/tunery/aliases`: the calling key's aliases.
- `GET /v1/tunery/aliases/{name}`: one of them.
- `POST /v1/tunery/aliases/{name}` with `{"model": …}`: create the alias, or switch it to another
  model (the one it pointed at is kept as `previous_model`, to switch back).
- `DELETE /v1/tunery/aliases/{name}`.

An alias points at a model its key could name itself (a builtin model, one of its `ft:` models or
checkpoints, a local model where the operator allows them), never at another alias, and is checked
when set and again on every request. It may not be a builtin model's name, and fine-tuned model ids
cannot be alias names (they hold a ':'), so an alias never changes what an existing name means.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from tunery.serve.alias_store import alias_object, alias_table, check_name
from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.resolver import Resolver, chat_aliases

router = APIRouter(prefix="/v1/tunery/aliases", tags=["tunery aliases"])


def check_alias(resolver: Resolver, who: Principal, name: str, target: Any) -> str:
    """The target of a new or switched alias, refused unless `who` may call it by its own name."""
    check_name(name)
    if name in chat_aliases() or resolver.registered(name) is not None:
        raise ApiError(
            400,
            f"`{name}` is a builtin or registered model's name; an alias may not shadow it. "
            "Pick another name.",
            code="invalid_alias",
            param="name",
        )
    if not isinstance(target, str) or not target:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    resolver.model(who, target)  # a 404 for another key's model, an unknown one, or an alias
    return target


@router.get("", summary="List the key's model aliases")
def list_aliases(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    rows = alias_table(request.app.state).list(who.id)
    return {"object": "list", "data": [alias_object(r) for r in rows]}


@router.get("/{name}", summary="Retrieve a model alias")
def retrieve_alias(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    return alias_object(alias_table(request.app.state).get(who.id, name))


@router.post("/{name}", summary="Create a model alias, or switch it to another model")
def set_alias(
    name: str, request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    state = request.app.state
    target = check_alias(Resolver(state.settings, state.store), who, name, body.get("model"))
    return alias_object(alias_table(state).set(who.id, name, target))


@router.delete("/{name}", summary="Delete a model alias")
def delete_alias(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    alias_table(request.app.state).delete(who.id, name)
    return {"id": name, "object": "tunery.alias.deleted", "deleted": True}
