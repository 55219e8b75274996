"""CLI pieces mounted in `tunery/cli/__init__.py`: `serve_command`, `jobs_app` (and `keys_app`, which
lives in keys_cli.py).

`tunery jobs ...` talks to a running server through the official `openai` SDK, exactly as any
client would (base URL and key from flags or TUNERY_BASE_URL / TUNERY_API_KEY, falling back to
OPENAI_BASE_URL / OPENAI_API_KEY).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer

from tunery.errors import TuneryError
from tunery.serve.keys_cli import keys_app  # noqa: F401 - re-exported: `tunery keys` lives in keys_cli.py

DEFAULT_DATA_DIR = os.environ.get("TUNERY_DATA_DIR") or str(Path.home() / ".tunery")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

jobs_app = typer.Typer(help="Fine-tuning jobs on a Tunery server (OpenAI API).", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; loopback unless told otherwise."),
    port: int = typer.Option(8000, help="TCP port."),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, help="Database, files and job runs live here."),
    api_key: str | None = typer.Option(None, envvar="TUNERY_API_KEY", help="The admin API key."),
    database_url: str | None = typer.Option(
        None, envvar="TUNERY_DATABASE_URL", help="SQLAlchemy URL (default: SQLite in the data dir)."
    ),
    no_auth: bool = typer.Option(False, "--no-auth", help="No keys at all; only allowed on loopback."),
    concurrency: int = typer.Option(1, min=1, help="Training jobs run at the same time."),
    gpus_per_job: int | None = typer.Option(
        None, "--gpus-per-job", min=1, help="GPUs each local job gets to itself (default 1 with GPUs)."
    ),
    executor: str = typer.Option("local", help="Where jobs run: local (subprocesses here) or ray."),
    ray_address: str | None = typer.Option(
        None, help="Ray dashboard URL for --executor ray (http://HEAD:8265)."
    ),
    ray_num_cpus: float = typer.Option(1.0, min=0, help="CPUs a job reserves on Ray unless it asks."),
    ray_num_gpus: float = typer.Option(0.0, min=0, help="GPUs a job reserves on Ray unless it asks."),
    max_upload_mb: int = typer.Option(512, min=1, help="Largest file upload."),
    max_body_mb: int = typer.Option(16, min=1, help="Largest JSON request body."),
    max_files_per_key: int = typer.Option(1000, min=1, help="Files one key may store."),
    max_active_jobs_per_key: int = typer.Option(
        4, min=0, help="Jobs one key may have validating, queued or running (0: no limit)."
    ),
    max_storage_mb_per_key: int = typer.Option(
        10240, min=0, help="MB of stored files one key may keep (0: no limit)."
    ),
    requests_per_minute: int = typer.Option(
        600, min=0, help="API requests one key may make per minute (0: no limit)."
    ),
    allow_local_models: bool | None = typer.Option(
        None,
        "--allow-local-models/--no-allow-local-models",
        help="Let requests name absolute paths on this machine (models, adapters, templates). "
        "Default: on with --no-auth, off when keys share the server.",
        show_default=False,
    ),
    judge: list[str] = typer.Option(
        [], "--judge", help="Register a judge endpoint NAME=URL that requests may name (repeatable)."
    ),
    judge_key_env: list[str] = typer.Option(
        [], "--judge-key-env", help="NAME=VAR: the judge NAME's key is in the variable VAR (repeatable)."
    ),
    worker_env: list[str] = typer.Option(
        [],
        "--worker-env",
        help="A variable workers may see beyond the allowlist, e.g. HF_TOKEN (repeatable).",
    ),
    store_mode: str = typer.Option(
        "request",
        "--store",
        help="Keep chat completions for `tunery logs` and the stored-completions API: off, "
        "request (those sent with store: true) or always.",
    ),
    store_max_age_days: int = typer.Option(
        30, min=0, help="Delete stored chat completions older than this (0: keep them)."
    ),
    store_max_rows: int = typer.Option(
        100_000,
        min=0,
        help="Keep at most this many stored chat completions, oldest deleted first (0: no cap).",
    ),
    engine: str = typer.Option(
        "auto",
        help="Inference engine: auto (llama.cpp on a CPU for every model it can run, else torch), "
        "torch, llamacpp or vllm. /v1/models says which engine serves each model.",
    ),
    gguf_type: str = typer.Option(
        "q8_0", help="Tensor type of the GGUF form llama.cpp serves: f32 (exact), f16, bf16 or q8_0."
    ),
    gguf_cache_mb: int = typer.Option(20480, min=0, help="MB of GGUF forms kept for llama.cpp (0: no cap)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the OpenAI-compatible fine-tuning and inference API."""
    flags = dict(locals())  # before any other local: every flag, by name (Settings fields)
    import uvicorn

    app = _startup(flags)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _startup(flags: dict[str, Any]) -> Any:
    """The app for `serve_command`'s flags, after printing the engine line and any warnings."""
    from tunery.serve.app import create_app
    from tunery.serve.common import Settings
    from tunery.serve.engines import startup_line

    try:
        settings = Settings(**_settings_fields(flags))
        engine_line = startup_line(settings.engine)
        app = create_app(settings)
    except TuneryError as exc:
        _fail(str(exc))
    typer.echo(engine_line, err=True)
    for name, var in settings.judge_key_envs.items():
        if var not in os.environ:
            typer.secho(f"warning: judge {name!r}: ${var} is not set; it gets no key.", fg="yellow", err=True)
    if not flags["no_auth"] and not flags["api_key"] and not app.state.store.list_keys():
        typer.secho(
            "warning: no API key exists yet; create one with `tunery keys create --name NAME "
            f"--data-dir {flags['data_dir']}` or pass --api-key.",
            fg="yellow",
            err=True,
        )
    return app


def _settings_fields(flags: dict[str, Any]) -> dict[str, Any]:
    """`serve_command`'s flags as `Settings` fields: the same names, but for the NAME=VALUE lists,
    parsed here, and the flags uvicorn takes."""
    fields = {k: v for k, v in flags.items() if k not in ("port", "log_level", "judge", "judge_key_env")}
    fields["judges"] = _pairs(flags["judge"], "--judge", _check_url)
    fields["judge_key_envs"] = _pairs(flags["judge_key_env"], "--judge-key-env", _check_env_name)
    fields["worker_env"] = tuple(_check_env_name(v, "--worker-env") for v in flags["worker_env"])
    return fields


def _pairs(values: list[str], flag: str, check) -> dict[str, str]:
    """`NAME=VALUE` flags as a dict; a malformed or repeated NAME is a TuneryError naming the flag."""
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or not value.strip():
            raise TuneryError(f"{flag} expects NAME=VALUE, got {item!r}.", code="invalid_config")
        if name in out:
            raise TuneryError(f"{flag} names {name!r} twice.", code="invalid_config")
        out[name] = check(value.strip(), flag)
    return out


def _check_url(value: str, flag: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TuneryError(f"{flag}: {value!r} is not an http(s) URL.", code="invalid_config")
    return value


def _check_env_name(value: str, flag: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise TuneryError(f"{flag}: {value!r} is not an environment variable name.", code="invalid_config")
    if value == "TUNERY_API_KEY":  # the admin key opens every key's data: no worker ever sees it
        raise TuneryError(f"{flag}: TUNERY_API_KEY is never passed to workers.", code="invalid_config")
    return value


def _client(base_url: str | None, api_key: str | None):
    from openai import OpenAI

    return OpenAI(
        base_url=base_url
        or os.environ.get("TUNERY_BASE_URL")
        or os.environ.get("OPENAI_BASE_URL")
        or DEFAULT_BASE_URL,
        api_key=api_key or os.environ.get("TUNERY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none",
    )


def _api_errors(fn):
    """Render the SDK's API errors as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            err = body.get("error", body) if isinstance(body, dict) else {}
            _fail(
                f"{exc.status_code}: {err.get('message') or exc.message}"
                + (f" (code {err['code']})" if err.get("code") else "")
            )
        except openai.APIConnectionError as exc:
            _fail(f"cannot reach the server: {exc}")

    return wrapper


BaseUrl = typer.Option(None, "--base-url", help="Server URL including /v1 (env TUNERY_BASE_URL).")
ApiKey = typer.Option(None, "--api-key", help="API key (env TUNERY_API_KEY).")


def _file_id(client: Any, value: str) -> str:
    if value.startswith("file-") and not Path(value).exists():
        return value
    path = Path(value)
    if not path.is_file():
        _fail(f"{value} is neither a file id nor a local file")
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    typer.echo(f"Uploaded {path.name} as {uploaded.id}", err=True)
    return uploaded.id


@jobs_app.command("create")
@_api_errors
def jobs_create(
    model: str = typer.Option(..., "--model", "-m", help="Base alias, local model dir or ft: model."),
    training_file: str = typer.Option(..., "--training-file", "-t", help="A file id or a local .jsonl."),
    validation_file: str | None = typer.Option(None, "--validation-file", "-v"),
    suffix: str | None = typer.Option(None),
    n_epochs: str = typer.Option("auto"),
    batch_size: str = typer.Option("auto"),
    learning_rate_multiplier: str = typer.Option("auto"),
    method: str = typer.Option("supervised", help="OpenAI method type: supervised or dpo."),
    beta: str | None = typer.Option(None, help="DPO beta."),
    tuning_method: str | None = typer.Option(
        None, "--tuning-method", help="Tunery method (lora, full, ...)."
    ),
    objective: str | None = typer.Option(None, help="Tunery objective (overrides --method)."),
    seed: int | None = typer.Option(None),
    classification_metrics: bool = typer.Option(
        False,
        "--compute-classification-metrics",
        help="Score the validation file as classification every evaluation (results.csv columns).",
    ),
    positive_class: str | None = typer.Option(
        None, "--classification-positive-class", help="The positive label, for binary metrics."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Then follow the job's events."),
    base_url: str | None = BaseUrl,
    api_key: str | None = ApiKey,
) -> None:
    """Create a fine-tuning job (uploading local files first)."""
    client = _client(base_url, api_key)

    def num(v: str) -> Any:
        return v if v == "auto" else (float(v) if "." in v or "e" in v else int(v))

    hp = {
        "n_epochs": num(n_epochs),
        "batch_size": num(batch_size),
        "learning_rate_multiplier": num(learning_rate_multiplier),
    }
    method_body: dict[str, Any] = {"type": method, method: {"hyperparameters": dict(hp)}}
    if method == "dpo" and beta is not None:
        method_body["dpo"]["hyperparameters"]["beta"] = num(beta)
    extra: dict[str, Any] = {}
    if tuning_method or objective:
        extra["tunery"] = {k: v for k, v in (("method", tuning_method), ("objective", objective)) if v}
    if classification_metrics:
        extra.setdefault("tunery", {})["compute_classification_metrics"] = True
    if positive_class:
        extra.setdefault("tunery", {})["classification_positive_class"] = positive_class
    kwargs: dict[str, Any] = {
        "model": model,
        "training_file": _file_id(client, training_file),
        "method": method_body,
    }
    if validation_file:
        kwargs["validation_file"] = _file_id(client, validation_file)
    if suffix:
        kwargs["suffix"] = suffix
    if seed is not None:
        kwargs["seed"] = seed
    job = client.fine_tuning.jobs.create(**kwargs, extra_body=extra or None)
    typer.echo(job.id)
    if follow:
        _follow(client, job.id)


@jobs_app.command("list")
@_api_errors
def jobs_list(
    limit: int = typer.Option(20), base_url: str | None = BaseUrl, api_key: str | None = ApiKey
) -> None:
    """List jobs, newest first."""
    for job in _client(base_url, api_key).fine_tuning.jobs.list(limit=limit).data:
        typer.echo(f"{job.id}\t{job.status}\t{job.model}\t{job.fine_tuned_model or ''}")


@jobs_app.command("get")
@_api_errors
def jobs_get(
    job_id: str,
    as_json: bool = typer.Option(False, "--json", help="Print the job object exactly as the API returns it."),
    base_url: str | None = BaseUrl,
    api_key: str | None = ApiKey,
) -> None:
    """Show one job: status, model, fine-tuned model, hyperparameters and error."""
    import httpx

    # The raw body, not the SDK's model of it: `--json` shows Tunery's extension fields too.
    job = _client(base_url, api_key).get(f"/fine_tuning/jobs/{job_id}", cast_to=httpx.Response).json()
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    error = job.get("error") or {}
    rows = {
        "id": job.get("id"),
        "status": job.get("status"),
        "model": job.get("model"),
        "fine_tuned_model": job.get("fine_tuned_model"),
        "method": (job.get("method") or {}).get("type"),
        "training_file": job.get("training_file"),
        "validation_file": job.get("validation_file"),
        "hyperparameters": json.dumps(job.get("hyperparameters") or {}),
        "trained_tokens": job.get("trained_tokens"),
        "error": f"{error.get('code')}: {error.get('message')}" if error.get("message") else None,
    }
    for name, value in rows.items():
        typer.echo(f"{name + ':':<18}{'' if value is None else value}")


@jobs_app.command("follow")
@_api_errors
def jobs_follow(job_id: str, base_url: str | None = BaseUrl, api_key: str | None = ApiKey) -> None:
    """Print a job's events until it ends; exit 0 only when it succeeded."""
    _follow(_client(base_url, api_key), job_id)


@jobs_app.command("cancel")
@_api_errors
def jobs_cancel(job_id: str, base_url: str | None = BaseUrl, api_key: str | None = ApiKey) -> None:
    """Cancel a job (it checkpoints and stops within seconds)."""
    job = _client(base_url, api_key).fine_tuning.jobs.cancel(job_id)
    typer.echo(f"{job.id}\t{job.status}")


def _follow(client: Any, job_id: str, interval: float = 1.0) -> None:
    """Poll retrieve + list_events, dedupe by event id, print oldest first (as OpenAI's clients do)."""
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        for ev in reversed(events):
            if ev.id not in seen:
                seen.add(ev.id)
                stamp = time.strftime("%H:%M:%S", time.localtime(ev.created_at))
                typer.echo(f"[{stamp}] {ev.message}")
        if job.status in ("succeeded", "failed", "cancelled", "paused"):
            if job.status == "succeeded":
                typer.echo(f"Fine-tuned model: {job.fine_tuned_model}")
                return
            if job.error and getattr(job.error, "message", None):
                typer.secho(f"{job.status}: {job.error.message}", fg="red", err=True)
            sys.exit(1)
        time.sleep(interval)
