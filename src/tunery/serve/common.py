"""What every router shares: the server settings, OpenAI-shaped errors, auth and the body limit."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from tunery.errors import TuneryError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass
class Settings:
    """Everything `tunery serve` can be told; `create_app(settings)` builds the server from it."""

    data_dir: Path = Path("tunery-data")
    host: str = "127.0.0.1"
    api_key: str | None = None  # the admin key; also read from TUNERY_API_KEY by the CLI
    database_url: str | None = None  # default: SQLite file in data_dir
    no_auth: bool = False  # every request acts as one local user; loopback only
    concurrency: int = 1  # training jobs run at once
    max_upload_mb: int = 512
    max_body_mb: int = 16  # JSON request bodies (uploads have their own limit)
    max_files_per_key: int = 1000
    cancel_grace_s: float = 30.0  # SIGTERM -> SIGKILL
    adapter_cache: int = 8  # adapters kept loaded per base model (LRU)
    allow_local_models: bool = True  # model specs may be local directories / .gguf files on the server
    run_executor: bool = True  # False: an API-only process (tests, or a separate executor host)
    executor: str = "local"  # local: worker subprocesses here; ray: Ray jobs on a cluster
    ray_address: str | None = None  # the Ray dashboard URL (http://HEAD:8265), for executor "ray"
    ray_num_cpus: float = 1.0  # what a job reserves on Ray unless it asks (tunery.resources)
    ray_num_gpus: float = 0.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.executor not in ("local", "ray"):
            raise TuneryError(f"Unknown executor {self.executor!r}: use local or ray.", code="invalid_config")
        if self.executor == "ray" and not self.ray_address:
            raise TuneryError(
                "--executor ray needs --ray-address, the Ray dashboard URL (e.g. http://HEAD:8265).",
                code="invalid_config",
            )
        if self.executor == "local" and self.ray_address:
            raise TuneryError("--ray-address is only used with --executor ray.", code="invalid_config")
        if self.no_auth and not is_loopback(self.host):
            raise TuneryError(
                f"--no-auth is only allowed when bound to loopback, not {self.host!r}.",
                hint="Bind to 127.0.0.1, or set --api-key.",
                code="invalid_config",
            )


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Principal:
    """Who is calling: the id owning their objects, a display name (used in ft: names), admin flag."""

    id: str
    name: str
    is_admin: bool = False


LOCAL = Principal("key_local", "local", True)


class ApiError(TuneryError):
    """An HTTP error with an explicit status (auth, limits); rendered like every TuneryError."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message, code=code, param=param)
        self.status = status
        self.type = type


_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def render_tunery_error(exc: TuneryError) -> JSONResponse:
    message = exc.message + (f" Hint: {exc.hint}" if exc.hint else "")
    status = getattr(exc, "status", 400)
    code = exc.code if exc.code not in ("tunery_error", "invalid_request_error") else None
    return error_response(status, message, code=code, param=exc.param, type=getattr(exc, "type", None))


def principal(request: Request) -> Principal:
    """The FastAPI dependency for auth: a Bearer key from the store, or the local user with --no-auth."""
    state = request.app.state
    if state.settings.no_auth:
        return LOCAL
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(
            401,
            "You didn't provide an API key. Provide it in an Authorization header "
            "(Authorization: Bearer YOUR_KEY).",
            code="invalid_api_key",
        )
    cache: dict[str, Principal] = state.key_cache
    found = cache.get(key)
    if found is None:
        row = state.store.key_for(key)
        if row is None:
            shown = key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)
            raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        found = cache[key] = Principal(row.id, row.name, row.is_admin)
    return found


def page(
    items: list[Any], after: str | None, limit: int, key=lambda x: x["id"], ids: bool = False
) -> dict[str, Any]:
    """A list page: items after the one with id `after`, `limit` of them, OpenAI's envelope."""
    if after is not None:
        for i, item in enumerate(items):
            if key(item) == after:
                items = items[i + 1 :]
                break
    out: dict[str, Any] = {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
    if ids:
        out["first_id"] = out["data"][0]["id"] if out["data"] else None
        out["last_id"] = out["data"][-1]["id"] if out["data"] else None
    return out


def check_limit(limit: int, maximum: int, param: str = "limit") -> int:
    if limit < 1 or limit > maximum:
        raise ApiError(400, f"Invalid value for '{param}': must be between 1 and {maximum}.", param=param)
    return limit


class BodyLimit:
    """ASGI middleware: refuse request bodies over the limit (by Content-Length, or while streaming
    when there is none). File uploads are exempt here; they enforce their own, larger limit."""

    def __init__(self, app, max_bytes: int, exempt: tuple[str, ...] = ("/v1/files",)):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(), code="request_too_large")
            return message

        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"Request body is larger than the server's limit of {self.max_bytes // (1 << 20)} MB."

    async def _reject(self, send):
        resp = error_response(413, self._message(), code="request_too_large")
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})
