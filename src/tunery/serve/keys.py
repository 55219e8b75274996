"""`/v1/tunery/keys`: list, revoke and rotate the server's API keys over HTTP.

Listing and revoking are for admin keys only. Rotating gives a key a new secret under the same id,
so it keeps its files, jobs and fine-tuned models; an admin may rotate any key, any key its own.
Rotating the `--api-key` admin key this way needs no restart, and the old key stays dead after one
(`Store.ensure_key`). Both take effect at once: the key cache is dropped on every change.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tunery.jobs.tables import ApiKey
from tunery.serve.common import ApiError, Principal, admin, principal

router = APIRouter(prefix="/v1/tunery/keys")


def key_object(row: ApiKey) -> dict[str, Any]:
    """A key as the API shows it: never the key or its hash, only the first characters."""
    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "prefix": row.prefix,
        "is_admin": bool(row.is_admin),
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }


@router.get("", summary="List the server's API keys (admin)")
def list_keys(request: Request, _who: Principal = Depends(admin)) -> dict[str, Any]:
    return {"object": "list", "data": [key_object(r) for r in request.app.state.store.list_keys()]}


@router.post("/{key_id}/revoke", summary="Revoke an API key at once (admin)")
def revoke_key(key_id: str, request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    store = request.app.state.store
    live_admins = [k for k in store.list_keys() if k.is_admin and k.revoked_at is None]
    if [k.id for k in live_admins] == [key_id]:
        raise ApiError(
            400,
            "This is the last admin key; revoking it would lock every admin out. Rotate it instead.",
            code="last_admin_key",
            param="key_id",
        )
    row = store.revoke_key(key_id)
    request.app.state.key_cache.clear()
    return key_object(row)


@router.post("/{key_id}/rotate", summary="Give an API key a new secret; the old one stops working")
def rotate_key(key_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    if not who.is_admin and who.id != key_id:
        raise ApiError(403, "Only an admin key can rotate another key.", code="admin_key_required")
    row, key = request.app.state.store.rotate_key(key_id)
    request.app.state.key_cache.clear()
    return {**key_object(row), "key": key}
