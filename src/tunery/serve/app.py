"""`create_app(settings)`: the OpenAI-compatible fine-tuning and inference API as one FastAPI app.

The app owns a `Store` (SQLite or PostgreSQL), an executor (training jobs in worker subprocesses,
or Ray jobs with `executor="ray"`) and a generation `Engine` (one base per model, an LRU of
adapters). Every error a client can cause comes back in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from python_multipart.exceptions import FormParserError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunery.errors import TuneryError
from tunery.jobs.local import LocalExecutor
from tunery.jobs.ray_executor import RayExecutor
from tunery.jobs.store import Store
from tunery.serve import aliases, classify, datasets, files, inference, jobs, keys, models, stored, ui
from tunery.serve.common import (
    Principal,
    RateLimiter,
    Settings,
    error_response,
    principal,
    render_tunery_error,
)
from tunery.serve.engines import get_engine
from tunery.serve.middleware import BodyLimit, LoopbackGuard

if TYPE_CHECKING:
    from tunery.jobs.executor import Executor

log = logging.getLogger("tunery.serve")


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.data_dir, settings.database_url)
    if settings.api_key and store.ensure_key(settings.api_key, name="admin", admin=True) is None:
        # Revoked or rotated away (POST /v1/tunery/keys/.../rotate, `tunery keys rotate`): it stays
        # dead; the server runs on the keys it has, the rotated admin key among them.
        log.warning("--api-key / TUNERY_API_KEY was revoked or rotated; it is not accepted.")
    try:
        executor = make_executor(settings, store) if settings.run_executor else None
    except TuneryError:
        store.close()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if executor is not None:
            executor.start()
        try:
            yield
        finally:
            if executor is not None:
                executor.stop()
            if app.state._engine is not None:
                app.state._engine.close()
            store.close()

    app = FastAPI(
        title="Tunery",
        version=_version(),
        lifespan=lifespan,
        description="Self-hosted, OpenAI-compatible fine-tuning and inference API.",
        # Served below behind the key check: the schema maps every endpoint for an attacker.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.executor = executor
    app.state.key_cache = {}
    app.state.rate_limiter = RateLimiter(settings.requests_per_minute)
    app.state._engine = None  # created by the first inference request (see get_engine)
    app.state.engine_lock = threading.Lock()
    if executor is not None and settings.engine != "torch":
        executor.on_model = lambda base, path: _prepare_soon(app.state, base, path)

    _install_handlers(app)
    _install_docs(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        # Open to anyone (load balancers, start scripts): it says that the server answers, nothing more.
        return {"status": "ok"}

    for module in (files, jobs, models, inference, stored, datasets, classify, ui, keys, aliases):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_mb * (1 << 20))
    if settings.no_auth:  # added last, so it runs first: a foreign Host or Origin gets nowhere
        app.add_middleware(LoopbackGuard, bound_host=settings.host)
    return app


def _install_handlers(app: FastAPI) -> None:
    """Every error a client can cause, in OpenAI's shape; a bug is a 500 naming only its type."""

    @app.exception_handler(TuneryError)
    async def _tunery(_request: Request, exc: TuneryError):
        return render_tunery_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = (
            "We could not parse the JSON body of your request."
            if err.get("type") == "json_invalid"
            else f"Invalid request{f' for {param!r}' if param else ''}: {err.get('msg')}."
        )
        return error_response(400, message, param=param)

    @app.exception_handler(FormParserError)
    async def _multipart(_request: Request, exc: FormParserError):
        # python-multipart raises these on a body that is not the multipart it claims to be.
        return error_response(
            400, f"We could not parse the multipart body of your request: {exc}", code="invalid_multipart"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = (
            f"Unknown request URL: {request.method} {request.url.path}."
            if exc.status_code == 404
            else str(exc.detail)
        )
        code = "unknown_url" if exc.status_code == 404 else None
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(
            500,
            f"The server had an error while processing your request: {type(exc).__name__}.",
            type="server_error",
        )


def _install_docs(app: FastAPI) -> None:
    """/openapi.json and /docs behind the same key as the API (open with --no-auth)."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(_who: Principal = Depends(principal)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(_who: Principal = Depends(principal)) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Tunery API")


def make_executor(settings: Settings, store: Store) -> Executor:
    """The executor `settings.executor` names; Ray is imported only when it is the one asked for."""
    common: dict[str, Any] = dict(
        concurrency=settings.concurrency,
        grace=settings.cancel_grace_s,
        database_url=settings.database_url,
        # Workers see an allowlist of the environment plus these: the registered judges' keys.
        env_allow=tuple(settings.judge_key_envs.values()) + tuple(settings.worker_env),
    )
    if settings.executor == "ray":
        if settings.gpus_per_job:
            raise TuneryError(
                "--gpus-per-job is for --executor local; Ray jobs reserve GPUs with --ray-num-gpus.",
                code="invalid_config",
            )

        return RayExecutor(
            store,
            cast(str, settings.ray_address),  # Settings requires it with executor "ray"
            num_cpus=settings.ray_num_cpus,
            num_gpus=settings.ray_num_gpus,
            **common,
        )
    return LocalExecutor(store, gpus_per_job=settings.gpus_per_job, **common)


def _prepare_soon(state: Any, base: str, model_dir: Any) -> None:
    """A job's new model gets its serving form (llama.cpp's GGUF files) in the background, so its
    first request does not wait for the conversion."""

    def work() -> None:
        try:
            get_engine(state).prepare(base, str(model_dir))
        except Exception as exc:  # noqa: BLE001 - the first request prepares it, and says why if it fails
            log.info("could not prepare %s for serving ahead of time: %s", model_dir, exc)

    threading.Thread(target=work, name="tunery-prepare", daemon=True).start()


def _version() -> str:
    try:
        return version("tunery")
    except Exception:
        return "0"
