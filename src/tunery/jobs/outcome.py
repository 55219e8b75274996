"""What a worker left in its run directory (`run.json`, `metrics.jsonl`, `config.yaml`,
`worker.log`, checkpoints), and recording a job's success from it. The executor concludes jobs with
these; the trainer writes the run directory (`train/rundir.py`)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunery.jobs.store import Store
from tunery.jobs.tables import Job, ModelRow, now

log = logging.getLogger("tunery.jobs")


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    return ckpts[-1] if ckpts else None


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def last_metrics(path: Path) -> dict[str, Any]:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def resolved_hparams(config_path: Path, hp: dict[str, Any]) -> dict[str, Any]:
    """The numbers `auto` became, from the run's resolved config.yaml."""
    try:
        resolved = (yaml.safe_load(config_path.read_text()) or {}).get("hyperparameters") or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {
        k: resolved[k]
        for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
        if k in hp and isinstance(resolved.get(k), int | float)
    }


def log_tail(path: Path, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def record_success(
    store: Store, job: Job, result: dict[str, Any], on_model: Callable[[str, Path], None] | None
) -> None:
    """Record the model, its final checkpoint, the result file and the job's success in one
    transaction (`Store.record_success`), so a crash in between leaves no half-finished job and
    no duplicate checkpoint row when the restarted server concludes it again."""
    run_dir = store.path(job.run_dir)
    model_rel = f"{job.run_dir}/{result.get('model_dir') or 'model'}"
    ext = job.tunery or {}
    model = ModelRow(
        name=job.output_name,
        owner=job.owner,
        base=ext.get("base_spec") or job.model,
        path=model_rel,
        job_id=job.id,
        created_at=now(),
    )
    metrics = last_metrics(run_dir / "metrics.jsonl")
    step = int(metrics.get("step", 0)) if metrics else 0
    checkpoint = {
        "step": step,
        "metrics": metrics or None,
        "model_name": job.output_name,
        "path": model_rel,
    }
    result_files, result_file = list(job.result_files or []), None
    csv = run_dir / "results.csv"
    if csv.is_file():
        # OpenAI serves result files base64-encoded; clients decode them, so we store them so.
        tmp = store.data_dir / "files" / ".tmp" / f"result-{job.id}"
        tmp.write_bytes(base64.b64encode(csv.read_bytes()))
        result_file = store.place_file(job.owner, "step_metrics.csv", "fine-tune-results", tmp)
        result_files.append(result_file.id)
    hp = dict(job.hyperparameters or {})
    hp.update(resolved_hparams(run_dir / "config.yaml", hp))
    done = None
    try:
        done = store.record_success(
            job.id,
            model,
            checkpoint,
            result_file,
            [
                ("info", f"New fine-tuned model created: {job.output_name}"),
                ("info", "The job has successfully completed"),
            ],
            status="succeeded",
            pid=None,
            finished_at=now(),
            fine_tuned_model=job.output_name,
            trained_tokens=int(result.get("trained_tokens") or 0),
            result_files=result_files,
            hyperparameters=hp,
            error=None,
        )
    finally:
        if done is None and result_file is not None:  # not recorded: no orphan file either
            store.path(result_file.path).unlink(missing_ok=True)
    if done is not None and on_model is not None:
        try:
            on_model(model.base, store.path(model_rel))
        except Exception:  # noqa: BLE001 - serving prepares lazily anyway; the job succeeded
            log.exception("preparing %s for serving failed", job.output_name)
