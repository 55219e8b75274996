"""Everything a run writes into its run directory besides the event stream: the resolved
`config.yaml`, `run.json` (how the run ended, which the server and `tunery train --nproc` read),
and at the end `results.csv` / `loss.png`. The CLI's run, the job worker and the executor all write
through here, so the run directory has one writer's layout.

Layout of a run directory:
    config.yaml     the config with hyperparameters resolved (written once the schedule is known)
    events.jsonl    every event (train/events.py); metrics.jsonl, the metric rows
    run.json        {"status", "error", "trained_tokens", "model_dir"}, written last
    results.csv     OpenAI's result columns; loss.png
    checkpoints/    step-NNNNNN (train/checkpoint.py)
    model/          the trained model or adapter
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunery.config import TuneryConfig
from tunery.fsutil import write_atomic
from tunery.train.events import write_results

RUN_JSON = "run.json"


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path | None
    status: str  # succeeded | failed | interrupted
    trained_tokens: int = 0
    final_metrics: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def write_status(
    run_dir: Path,
    status: str,
    *,
    error: dict[str, Any] | None = None,
    trained_tokens: int = 0,
    model_dir: str | None = None,
) -> None:
    """run.json: how the run ended. `model_dir` is relative to the run directory ("model")."""
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"status": status, "error": error, "trained_tokens": trained_tokens, "model_dir": model_dir}
    write_json_atomic(run_dir / RUN_JSON, doc)


def write_result(result: RunResult) -> None:
    """run.json for a run that ended without raising (succeeded or interrupted)."""
    write_status(
        result.output_dir,
        result.status,
        trained_tokens=result.trained_tokens,
        model_dir="model" if result.model_dir else None,
    )


def clear_status(run_dir: Path) -> None:
    """Remove a previous attempt's run.json: a stale one would be read as this attempt's end."""
    (run_dir / RUN_JSON).unlink(missing_ok=True)


def write_config(config: TuneryConfig, out: Path, resolved: dict[str, Any]) -> None:
    """config.yaml with the hyperparameters the run resolved (auto -> numbers)."""
    data = config.to_dict()
    data["hyperparameters"].update(resolved)
    write_atomic(out / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def finish(out: Path, model_dir: Path | None, classification: bool = False) -> None:
    """results.csv and loss.png (with `classification`, OpenAI's classification columns); a run that
    saved no model leaves no partial model/ behind."""
    write_results(out, classification)
    if model_dir is None:
        shutil.rmtree(out / "model", ignore_errors=True)
