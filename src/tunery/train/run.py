"""`run(config)`: one fine-tuning run, the path the CLI, the server's worker and the benchmarks share.

This module is the recipe, top to bottom; read it first. The stages, in the order they run:

    run        open the run directory, its event log and trackers; record how the run ended
    _run       validate: the data before any model (load_and_validate, mix), then join the ranks
    _train     build (train/setup.py: model, features, steps, optimizer, context, saver)
               -> loop (train/loop.py) -> _end: save the model, finish the run directory

Builders that return values live in train/setup.py, the loop in train/loop.py, and everything
written into the run directory besides events in train/rundir.py. One process and several ranks
take the same path: the loop talks to `single.SingleProcess` or `distributed.Dist`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.config import TuneryConfig
from tunery.data import load_dataset, validate_file
from tunery.data.stats import warn_leakage
from tunery.data.tasks import file_task
from tunery.data.types import Dataset
from tunery.errors import ConfigError, DataError, TuneryError
from tunery.objectives import OBJECTIVES
from tunery.train import hparams, launch, rundir
from tunery.train.events import EventLog, Subscriber
from tunery.train.levers import DEFAULT as DEFAULT_LEVERS
from tunery.train.levers import Levers
from tunery.train.rundir import RunResult
from tunery.train.trackers import close_all, make_trackers

if TYPE_CHECKING:  # annotations only: these load torch
    from tunery.methods import Method
    from tunery.objectives.base import Objective
    from tunery.train.loop import LoopState
    from tunery.train.setup import RunData


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_and_validate(config: TuneryConfig, data_kind: str, objective_name: str):
    """Validate and load the training (and validation) data before any model is touched."""
    if not config.data.train:
        raise DataError(
            "No training data given.",
            hint="Pass --data FILE or set data.train in the config.",
            param="training_file",
        )
    paths = [config.data.train] if isinstance(config.data.train, str) else list(config.data.train)
    datasets = []
    for path in paths:
        validate_file(path, method=objective_name, kind=data_kind).raise_for_errors()
        datasets.append(load_dataset(path, kind=data_kind))
    val_paths = validation_paths(config)
    vals = []
    for path in val_paths:
        validate_file(path, method=objective_name, kind=data_kind, min_examples=1).raise_for_errors()
        vals.append(load_dataset(path, kind=data_kind))
    val, val_tasks = merge_validation(vals)
    return datasets, val, val_tasks


def validation_paths(config: TuneryConfig) -> list[str]:
    """data.validation as a list: one file, or one per task (parallel to a data.train list)."""
    val = config.data.validation
    return [] if not val else [val] if isinstance(val, str) else list(val)


def row_task(example: Any) -> str | None:
    """The task a validation row names (top-level `task`, else `source`), as `tunery logs compare`
    reads it (evaluate/heldout.py); only chat rows keep their other fields."""
    extra = getattr(example, "extra", None) or {}
    name = extra.get("task", extra.get("source"))
    return name.strip() if isinstance(name, str) and name.strip() else None


def metric_name(task: str) -> str:
    """A task name as a metric key's suffix: characters trackers refuse (MLflow) become `_`."""
    return re.sub(r"[^\w.\-: /]", "_", task)


def merge_validation(vals: list) -> tuple[Any, list[str] | None]:
    """(one validation set, each example's task or None). A row's own task comes first; with several
    files a row without one takes its file's name (`routing.valid.jsonl` is `routing`), rows of one
    file with none are `no_task`. Tasks are None when the set holds at most one."""
    if not vals:
        return None, None
    merged, names = vals[0], ["no_task"]
    if len(vals) > 1:
        names = [file_task(Path(ds.path)) for ds in vals]
        if len(set(names)) < len(names):
            raise ConfigError(
                f"data.validation files share a task name ({', '.join(names)}): name them apart.",
                param="data.validation",
            )
        merged = Dataset(
            path=",".join(ds.path for ds in vals),
            format=vals[0].format,
            kind=vals[0].kind,
            examples=[ex for ds in vals for ex in ds.examples],
            content_hash="+".join(ds.content_hash for ds in vals),
        )
    tasks = [
        metric_name(row_task(ex) or name) for ds, name in zip(vals, names, strict=True) for ex in ds.examples
    ]
    return merged, tasks if len(set(tasks)) > 1 else None


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


def run(
    config: TuneryConfig, subscribers: list[Subscriber] | None = None, levers: Levers = DEFAULT_LEVERS
) -> RunResult:
    """Train one run into config.output. User errors end as status failed (raised again for the CLI).

    `levers` are the benchmark's switches (train/levers.py); every other caller keeps the defaults."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    main = launch.is_main_process()  # with several processes only rank 0 writes the run directory and reports
    events = EventLog(out, enabled=main)
    for sub in subscribers or []:
        events.subscribe(sub)
    trackers: list = []
    status = "failed"  # what the trackers record if anything below raises
    try:
        # report_to: they subscribe like any other consumer; one that cannot start only warns
        if main:
            trackers = make_trackers(config, out, warn=lambda msg: events.emit(msg, level="warn"))
        for tracker in trackers:
            events.subscribe(tracker)
        result = _run(config, out, events, levers)
        status = result.status
    except TuneryError as exc:
        err = {"code": exc.code, "message": exc.message, "param": exc.param}
        events.emit(f"Run failed: {exc.message}", level="error")
        if main:
            rundir.write_status(out, "failed", error=err)
        raise
    finally:
        close_all(trackers, status)
    return result  # run.json was written by `_end`, inside the signal scope


def _run(config: TuneryConfig, out: Path, events: EventLog, levers: Levers) -> RunResult:
    """Validate (data before any model), then train on this process or as one rank of several."""
    # Here, not at the top: these load torch, and `import tunery.train` stays light (the job executor
    # and the CLI's jemalloc re-exec import its light modules). Listed in tunery/optional.py EXCEPTIONS.
    from tunery.methods import METHODS
    from tunery.plugins import validate_options
    from tunery.train import distributed
    from tunery.train.single import SingleProcess

    validate_options(config)  # a config built without the registries (TuneryConfig(...)) is checked here
    method = METHODS.get(config.method)
    objective = OBJECTIVES.get(config.objective)
    datasets, val, val_tasks = load_and_validate(config, objective.data_kind, objective.name)
    examples = mix(datasets, config.data.weights, config.seed)
    events.emit(
        f"Files validated: {len(examples)} training examples"
        + (f", {len(val)} validation examples" if val else "")
    )
    if val is not None:  # a validation set that overlaps training measures memorisation, not skill
        warn_leakage(examples, val.examples, events.emit, ", ".join(validation_paths(config)))

    from tunery.train.setup import RunData  # loads the model builders: after the data checks

    data = RunData(datasets, examples, val, val_tasks)
    # A process launched as one of several ranks joins the group first (see train/distributed.py);
    # one process alone trains through the same interface with identity collectives.
    dist = distributed.start(config) if launch.launched() else SingleProcess()
    try:
        return _train(config, out, events, method, objective, data, dist, levers)
    finally:
        dist.close()


def _train(
    config: TuneryConfig,
    out: Path,
    events: EventLog,
    method: Method,
    objective: Objective,
    data: RunData,
    dist: Any,  # single.SingleProcess or distributed.Dist: the same methods
    levers: Levers,
) -> RunResult:
    """Build -> loop -> save -> finish: the whole recipe, in the order it runs."""
    # torch and the builders load here, not at the top: importing tunery.train (the server and the
    # job executor do) stays light. Listed in tunery/optional.py EXCEPTIONS.
    import torch

    from tunery.train import setup
    from tunery.train.loop import LoopSetup, LoopState, stop_on_signals, train_loop

    hp = config.hyperparameters
    seed_everything(config.seed)  # the same seed everywhere: every rank builds the same initial model
    model, tokenizer = setup.build_model(config, method, config.method_options, objective)
    dist.check_objective(objective)
    features, val_features, val_tasks = setup.encode_data(config, objective, tokenizer, data, dist, events)
    res = hparams.resolve(hp, len(features), method.base_learning_rate, setup.device_type())
    lengths, steps = setup.plan_steps(config, objective, features, res)
    if dist.is_main:
        rundir.write_config(config, out, res.as_dict())
    setup.report_parameters(model, events)
    packed, fused, shared = setup.speedups(model, config, method, levers)
    accelerator, dtype = setup.build_accelerator(hp, dist)
    dist.lengths, dist.token_budget = lengths, setup.token_budget(hp)  # the ranks' data split
    model, optimizer, scheduler = setup.build_optimizer(
        model, method, config.method_options, res, config, len(steps), accelerator, dist
    )
    save = setup.model_saver(model, config, method, objective, tokenizer, accelerator, dist)
    loop = LoopSetup(
        model=model,
        objective=objective,
        ctx=setup.build_context(model, config, objective, tokenizer),
        features=features,
        val_features=val_features,
        steps=steps,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        events=events,
        run_dir=out,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        packed=packed,
        max_grad_norm=hp.max_grad_norm,
        logging_steps=hp.logging_steps,
        eval_steps=hp.eval_steps,
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        save_model=save,
        dist=dist,
        aux_loss=method.aux_loss,
        after_step=method.after_step,
        method_metrics=method.metrics,
        extra_eval=setup.classification_eval(config, tokenizer, data.validation, data.val_tasks),
        shape_buckets=not torch.cuda.is_available() and dtype == torch.bfloat16,
        levers=levers,
        share_prefix=shared,
        val_tasks=val_tasks,
    )
    if config.resume:
        state = setup.resume(loop, events)
    else:
        state = LoopState()
        # What actually runs, not what was asked for: a silent fallback (no packing, no fusion, another
        # precision) would otherwise pass for the requested setting in tests and benchmarks.
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        ran = {"packed": packed, "fused": fused, "precision": precision, "buckets": loop.shape_buckets}
        ran["shared_prefix"] = shared
        events.emit("Fine-tuning job started", data={"total_steps": len(steps), **res.as_dict(), **ran})
    # One signal scope for the steps and the final save: a SIGTERM during the save (a cancel, or an
    # orphaned worker whose server died) would otherwise kill the process before run.json is written.
    with stop_on_signals(state):
        state = train_loop(loop, state)
        return _end(state, out, events, save, dist, classification=loop.extra_eval is not None)


def _end(
    state: LoopState,
    out: Path,
    events: EventLog,
    save: Callable[[Path], None],
    dist: Any,
    classification: bool = False,
) -> RunResult:
    """Save the model (unless interrupted) and finish the run directory (`classification`: the run
    computed classification metrics, which results.csv then holds)."""
    if state.interrupted:
        events.emit(f"Training interrupted at step {state.step}; resume with --resume", level="warn")
        result = RunResult(out, None, "interrupted", state.trained_tokens, state.last_metrics)
    else:
        model_dir = out / "model"
        save(model_dir)
        events.emit(f"New fine-tuned model created: {model_dir}", data={"kind": "model", "path": "model"})
        result = RunResult(out, model_dir, "succeeded", state.trained_tokens, state.last_metrics)
    if dist.is_main:
        rundir.finish(out, result.model_dir, classification)
    if result.status == "succeeded":
        events.emit("The job has successfully completed", data={"trained_tokens": state.trained_tokens})
    if dist.is_main:
        rundir.write_result(result)  # run.json last: the record that the run ended, and how
    return result
