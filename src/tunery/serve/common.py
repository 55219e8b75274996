"""What every router shares: the server settings, OpenAI-shaped errors, auth and per-key limits.
The ASGI middlewares (body limit, the loopback guard of `--no-auth`) are in `middleware.py`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tunery.errors import TuneryError
from tunery.export.gguf_file import GGUF_TYPES
from tunery.jobs.tables import ACTIVE_STATUSES
from tunery.redact import scrub_paths
from tunery.serve.engines import ENGINES

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
MIB = 1 << 20
# A key found in the cache is looked up again after this long even when no revocation was seen
# (another server on the same database may have revoked it).
KEY_CACHE_TTL_S = 10.0


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
    engine: str = "auto"  # serving engine: auto, torch, llamacpp or vllm (serve/engines)
    gguf_type: str = "q8_0"  # tensor type of the GGUF forms llama.cpp serves
    gguf_cache_mb: int = 20480  # the GGUF forms kept for llama.cpp, least recently used deleted (0: no cap)
    # Requests may name absolute paths on the server (models, adapters, templates). None: on only for
    # --no-auth (one local user), off when keys share the server (see serve/resolver.py).
    allow_local_models: bool | None = None
    judges: dict[str, str] = field(default_factory=dict)  # judge endpoints requests may name: NAME -> URL
    judge_key_envs: dict[str, str] = field(default_factory=dict)  # NAME -> variable holding its key
    worker_env: tuple[str, ...] = ()  # more variables workers may see (e.g. HF_TOKEN); see jobs/worker_env.py
    run_executor: bool = True  # False: an API-only process (tests, or a separate executor host)
    executor: str = "local"  # local: worker subprocesses here; ray: Ray jobs on a cluster
    ray_address: str | None = None  # the Ray dashboard URL (http://HEAD:8265), for executor "ray"
    ray_num_cpus: float = 1.0  # what a job reserves on Ray unless it asks (tunery.resources)
    ray_num_gpus: float = 0.0
    gpus_per_job: int | None = None  # GPUs per local worker (jobs/gpus.py); None: one if there are any
    # Per-key quotas (0 turns one off). A key over one gets a 429 naming the limit.
    max_active_jobs_per_key: int = 4  # jobs validating, queued or running at once
    max_storage_mb_per_key: int = 10240  # bytes of stored files (uploads and result files)
    requests_per_minute: int = 600  # authenticated API requests, over a sliding minute
    max_eval_export_params: int = 8_000_000_000  # models one evaluate/export call loads (0: no cap)
    # Stored chat completions (serve/stored.py): off, request (`store: true`) or always; retention.
    store_mode: str = "request"
    store_max_age_days: int = 30  # older stored completions are deleted (0: kept)
    store_max_rows: int = 100_000  # beyond this many, the oldest are deleted (0: no cap)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.allow_local_models is None:
            self.allow_local_models = self.no_auth
        unknown = sorted(set(self.judge_key_envs) - set(self.judges))
        if unknown:
            raise TuneryError(
                f"--judge-key-env names judge(s) not registered with --judge: {', '.join(unknown)}.",
                code="invalid_config",
            )
        if self.store_mode not in ("off", "request", "always"):
            raise TuneryError(
                f"Unknown --store {self.store_mode!r}: use off, request or always.", code="invalid_config"
            )
        if self.engine not in ENGINES:
            raise TuneryError(
                f"Unknown --engine {self.engine!r}: use {', '.join(ENGINES)}.", code="invalid_config"
            )
        if self.gguf_type not in GGUF_TYPES:
            raise TuneryError(
                f"Unknown --gguf-type {self.gguf_type!r}: use {', '.join(GGUF_TYPES)}.", code="invalid_config"
            )
        if self.gguf_cache_mb < 0:
            raise TuneryError("--gguf-cache-mb must be 0 (no cap) or more.", code="invalid_config")
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
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, code=code, param=param)
        self.status = status
        self.type = type
        self.headers = headers


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
            # Every message passes here: none may show where the server keeps its files.
            "message": scrub_paths(message),
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
    return error_response(
        status,
        message,
        code=code,
        param=exc.param,
        type=getattr(exc, "type", None),
        headers=getattr(exc, "headers", None),
    )


def principal(request: Request) -> Principal:
    """The FastAPI dependency for auth: a Bearer key from the store, or the local user with --no-auth.
    Every authenticated request also counts against the key's requests per minute."""
    state = request.app.state
    who = LOCAL if state.settings.no_auth else _authenticate(state, request.headers.get("authorization", ""))
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    wait = limiter.hit(who.id) if limiter is not None else None
    if limiter is not None and wait is not None:
        raise ApiError(
            429,
            f"Rate limit reached: this key may make {limiter.per_minute} requests per minute. "
            f"Try again in {wait:.0f} s.",
            code="requests_per_minute_exceeded",
            type="rate_limit_error",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    return who


def _authenticate(state: Any, header: str) -> Principal:
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(
            401,
            "You didn't provide an API key. Provide it in an Authorization header "
            "(Authorization: Bearer YOUR_KEY).",
            code="invalid_api_key",
        )
    cache: dict[str, tuple[Principal, float]] = state.key_cache
    # A revocation or rotation (by this server or by `tunery keys` on the same data dir) changes the
    # store's key stamp; the cache is dropped at once so a revoked key never answers from it.
    stamp = state.store.keys_stamp()
    if stamp != getattr(state, "key_cache_stamp", None):
        cache.clear()
        state.key_cache_stamp = stamp
    found = cache.get(key)
    if found is None or time.monotonic() - found[1] > KEY_CACHE_TTL_S:
        row = state.store.key_for(key)
        if row is None:
            cache.pop(key, None)
            shown = key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)
            raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        found = cache[key] = (Principal(row.id, row.name, row.is_admin), time.monotonic())
    return found[0]


def admin(request: Request) -> Principal:
    """The dependency of admin-only endpoints: the server's admin keys (or the --no-auth user)."""
    who = principal(request)
    if not who.is_admin:
        raise ApiError(403, "This endpoint needs an admin key.", code="admin_key_required")
    return who


class RateLimiter:
    """Requests per minute per key: the times of each key's last requests in a sliding window."""

    def __init__(self, per_minute: int, window_s: float = 60.0):
        self.per_minute = per_minute
        self.window_s = window_s
        self._seen: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()  # sync endpoints run this dependency from several threads

    def hit(self, key_id: str) -> float | None:
        """Count one request; None when allowed, else the seconds until the next one would be."""
        if self.per_minute <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._seen[key_id]
            while seen and now - seen[0] >= self.window_s:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return self.window_s - (now - seen[0])
            seen.append(now)
        return None


def check_job_quota(request: Request, who: Principal) -> None:
    """Refuse one more active job (validating, queued or running) for a key at its limit, so one
    key cannot hold every worker."""
    limit = request.app.state.settings.max_active_jobs_per_key
    if limit <= 0:
        return
    active = request.app.state.store.count_jobs(who.id, ACTIVE_STATUSES)
    if active >= limit:
        raise ApiError(
            429,
            f"This key already has {active} fine-tuning jobs queued or running; the server allows "
            f"{limit} per key. Wait for one to finish or cancel one.",
            code="active_jobs_limit_exceeded",
            type="rate_limit_error",
        )


def check_storage_quota(request: Request, who: Principal) -> None:
    """Refuse an upload that would take a key's stored files over its byte quota. The request's
    Content-Length bounds the new file from above (multipart adds a few hundred bytes)."""
    settings = request.app.state.settings
    limit = settings.max_storage_mb_per_key * MIB
    if limit <= 0:
        return
    length = request.headers.get("content-length", "")
    incoming = int(length) if length.isdigit() else 0
    used = request.app.state.store.storage_bytes(who.id)
    if used + incoming > limit:
        raise ApiError(
            429,
            f"This key stores {used / MIB:.1f} MB of files; with this upload it would pass the server's "
            f"limit of {settings.max_storage_mb_per_key} MB per key. Delete some files first.",
            code="storage_limit_exceeded",
            type="rate_limit_error",
        )


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


def check_metadata(meta: Any) -> dict[str, str] | None:
    """OpenAI's `metadata`: at most 16 string pairs, keys up to 64 characters, values up to 512; and
    no NUL character: PostgreSQL cannot store one in a text column (a 500 would be the only sign)."""
    if meta is None:
        return None
    if (
        not isinstance(meta, dict)
        or len(meta) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()
        )
    ):
        raise ApiError(
            400,
            "metadata must be at most 16 string pairs (keys up to 64 characters, values up to 512).",
            param="metadata",
        )
    if any("\x00" in k or "\x00" in v for k, v in meta.items()):
        raise ApiError(400, "metadata keys and values must not contain NUL characters.", param="metadata")
    return meta


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[KEY]=VALUE` query parameters of a list request, as OpenAI's lists take them."""
    return {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }


@contextlib.asynccontextmanager
async def every(seconds: float, fn: Callable[..., Any], *args: Any) -> AsyncIterator[None]:
    """Run the blocking `fn(*args)` now and then every `seconds` in a worker thread, for as long as
    the block lasts (a router's lifespan): the server's sweepers."""
    await run_in_threadpool(fn, *args)

    async def periodically() -> None:
        while True:
            await asyncio.sleep(seconds)
            await run_in_threadpool(fn, *args)

    task = asyncio.create_task(periodically())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
