"""`run(config)`: one fine-tuning run, the path the CLI, the server's worker and the benchmarks share.

config -> validate data (before any model) -> load model -> apply method -> encode (cached)
       -> schedule -> train_loop -> save model -> results
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunery.config import TuneryConfig
from tunery.errors import DataError, TuneryError
from tunery.fsutil import write_atomic
from tunery.train.events import EventLog, Subscriber, write_results


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path | None
    status: str  # succeeded | failed | interrupted
    trained_tokens: int = 0
    final_metrics: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def load_and_validate(config: TuneryConfig, data_kind: str, objective_name: str):
    """Validate and load the training (and validation) data before any model is touched."""
    from tunery.data import load_dataset, validate_file

    if not config.data.train:
        raise DataError(
            "No training data given.",
            hint="Pass --data FILE or set data.train in the config.",
            param="training_file",
        )
    paths = [config.data.train] if isinstance(config.data.train, str) else list(config.data.train)
    datasets = []
    for path in paths:
        validate_file(path, method=objective_name).raise_for_errors()
        datasets.append(load_dataset(path, kind=data_kind))
    val = None
    if config.data.validation:
        validate_file(config.data.validation, method=objective_name, min_examples=1).raise_for_errors()
        val = load_dataset(config.data.validation, kind=data_kind)
    return datasets, val


def mix(datasets: list, weights: list[float] | None, seed: int) -> list:
    """Concatenate tasks; with weights, draw each task's share of the total (with replacement)."""
    if weights is None:
        return [ex for ds in datasets for ex in ds.examples]
    if len(weights) != len(datasets):
        raise TuneryError(f"data.weights has {len(weights)} entries for {len(datasets)} training files")
    total = sum(len(ds) for ds in datasets)
    rng = random.Random(seed)
    out = []
    for ds, w in zip(datasets, weights, strict=True):
        k = max(1, round(total * w / sum(weights)))
        out.extend(ds.examples[i % len(ds)] if i < len(ds) else rng.choice(ds.examples) for i in range(k))
    return out


def run(config: TuneryConfig, subscribers: list[Subscriber] | None = None) -> RunResult:
    """Train one run into config.output. User errors end as status failed (raised again for the CLI)."""
    from tunery.train.distributed import is_main_process

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    main = is_main_process()  # with several processes only rank 0 writes the run directory and reports
    events = EventLog(out, enabled=main)
    for sub in subscribers or []:
        events.subscribe(sub)
    from tunery.train.trackers import close_all, make_trackers

    trackers: list = []
    status = "failed"  # what the trackers record if anything below raises
    try:
        # report_to: they subscribe like any other consumer; one that cannot start only warns
        if main:
            trackers = make_trackers(config, out, warn=lambda msg: events.emit(msg, level="warn"))
        for tracker in trackers:
            events.subscribe(tracker)
        result = _run(config, out, events)
        status = result.status
    except TuneryError as exc:
        err = {"code": exc.code, "message": exc.message, "param": exc.param}
        events.emit(f"Run failed: {exc.message}", level="error")
        if main:
            write_json_atomic(
                out / "run.json", {"status": "failed", "error": err, "trained_tokens": 0, "model_dir": None}
            )
        raise
    finally:
        close_all(trackers, status)
    if not main:
        return result
    write_json_atomic(
        out / "run.json",
        {
            "status": result.status,
            "error": None,
            "trained_tokens": result.trained_tokens,
            "model_dir": "model" if result.model_dir else None,
        },
    )
    return result


def _run(config: TuneryConfig, out: Path, events: EventLog) -> RunResult:
    from tunery.methods import METHODS
    from tunery.objectives import OBJECTIVES

    method = METHODS.get(config.method)
    objective = OBJECTIVES.get(config.objective)
    method_opts, objective_opts = config.method_options, config.objective_options
    datasets, val = load_and_validate(config, objective.data_kind, objective.name)
    examples = mix(datasets, config.data.weights, config.seed)
    events.emit(
        f"Files validated: {len(examples)} training examples"
        + (f", {len(val)} validation examples" if val else "")
    )
    if val is not None:  # a validation set that overlaps training measures memorisation, not skill
        from tunery.data.stats import warn_leakage

        warn_leakage(examples, val.examples, events.emit, config.data.validation)

    from tunery.train import setup

    return setup.train(
        config, out, events, method, objective, method_opts, objective_opts, datasets, examples, val
    )


def write_config(config: TuneryConfig, out: Path, resolved: dict[str, Any]) -> None:
    data = config.to_dict()
    data["hyperparameters"].update(resolved)
    write_atomic(out / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def finish(out: Path, model_dir: Path | None) -> None:
    write_results(out)
    if model_dir is None:
        shutil.rmtree(out / "model", ignore_errors=True)
