"""Standard benchmarks through EleutherAI's lm-eval harness (`tunery eval --benchmark`).

A model (and adapter) loads through Tunery's own resolution (`load_for_inference`: aliases, local dirs,
run dirs) and goes to lm-eval as an already-loaded Hugging Face model (`HFLM(pretrained=model)`).

Tasks are named (lm-eval's registry; online, since their datasets come from the hub) or given as
local task YAML files or directories of them. A local YAML's relative `data_files` are resolved
against the YAML's own folder, so a task directory works from any working directory and offline;
the directories also go to lm-eval's `TaskManager(include_path=...)`, so groups and `include:` work.
`tunery_general_knowledge` is the task shipped with Tunery (`evaluate/benchmarks/`).

lm-eval is optional: `pip install 'tunery[bench]'`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from tunery.errors import DataError, TuneryError

BUNDLED_DIR = Path(__file__).parent / "benchmarks"
BUNDLED = {"tunery_general_knowledge": BUNDLED_DIR / "general_knowledge" / "tunery_general_knowledge.yaml"}
# No square brackets: the CLI prints hints as rich markup, which would eat "[bench]".
INSTALL_HINT = "Install it with `pip install 'lm-eval==0.4.13' tenacity` (Tunery's `bench` extra)."


def require_lm_eval() -> None:
    """A TuneryError saying how to install lm-eval where it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TuneryError(
            "Benchmarks need EleutherAI's lm-eval harness, which is not installed.", hint=INSTALL_HINT
        ) from None


def split_tasks(arg: str | Sequence[str]) -> list[str]:
    """`a,b` or ["a", "b,c"] -> ["a", "b", "c"] (order kept, duplicates dropped)."""
    items = [arg] if isinstance(arg, str) else list(arg)
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            if part.strip() and part.strip() not in out:
                out.append(part.strip())
    if not out:
        raise TuneryError("--benchmark needs at least one task name or task YAML path.", param="benchmark")
    return out


@dataclass
class TaskSpecs:
    """What to hand lm-eval: registered names, local task configs (paths resolved), include dirs."""

    names: list[str] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    include: list[str] = field(default_factory=list)

    @property
    def specs(self) -> list[str | dict[str, Any]]:
        return [*self.names, *self.configs]

    @property
    def task_names(self) -> list[str]:
        return [*self.names, *(str(c["task"]) for c in self.configs)]


def _looks_like_path(item: str) -> bool:
    return item.endswith((".yaml", ".yml")) or "/" in item or Path(item).exists()


def resolve_tasks(items: Iterable[str]) -> TaskSpecs:
    """Names stay names; the bundled task and YAML files/directories become resolved configs."""
    out = TaskSpecs()
    for item in items:
        if item in BUNDLED:
            item = str(BUNDLED[item])
        if not _looks_like_path(item):
            out.names.append(item)
            continue
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(
                f"task file not found: {item}",
                file=item,
                hint="Pass a task name, or the path of an lm-eval task YAML or a folder of them.",
            )
        files = sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]) if path.is_dir() else [path]
        if not files:
            raise DataError(f"no task YAML (*.yaml) in {item}", file=item)
        folders = {str(f.parent.resolve()) for f in files}
        out.include += [d for d in sorted(folders) if d not in out.include]
        for f in files:
            cfg = load_task_yaml(f)
            if isinstance(cfg.get("task"), str) and "group" not in cfg:
                out.configs.append(cfg)
            elif isinstance(cfg.get("group"), str):
                out.names.append(cfg["group"])  # found through include_path
    return out


def load_task_yaml(path: Path) -> dict[str, Any]:
    """One lm-eval task YAML (its `include:` and `!function` resolved), relative data files made
    absolute against its folder. DataError for anything that is not a readable task config."""
    require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path.resolve(), resolve_func=True)
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}".replace("\n", " "), file=str(path)) from None
    except (OSError, ImportError, AttributeError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"cannot read this task YAML: {exc}", file=str(path)) from None
    if not isinstance(cfg, dict) or not ("task" in cfg or "group" in cfg):
        raise DataError(
            "an lm-eval task YAML needs a 'task' key (or 'group' for a group of tasks).",
            file=str(path),
            field="task",
        )
    kwargs = cfg.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is not None:
        kwargs["data_files"] = _absolute(files, path.parent.resolve())
    return cfg


def _absolute(files: Any, root: Path) -> Any:
    if isinstance(files, str):
        p = Path(files).expanduser()
        return files if "://" in files or p.is_absolute() else str(root / p)
    if isinstance(files, list):
        return [_absolute(f, root) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, root) for k, v in files.items()}
    return files


@contextmanager
def _quiet_lm_eval(verbose: bool):
    """lm-eval logs every setting at INFO/WARNING; keep errors only unless asked. It also records the
    cwd's git commit by running `git describe`, which prints "fatal: not a git repository" outside
    one: Tunery's results record the model and adapter instead."""
    from lm_eval import evaluator

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    git_hash = evaluator.get_git_commit_hash
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = git_hash
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@functools.cache
def _registry() -> Any:
    """lm-eval's own task registry, indexed once per process: it reads ~15k task YAML files (18 s on
    one core here), and only an lm-eval upgrade changes it. Local task dirs are read on every call."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def task_manager(specs: TaskSpecs) -> Any:
    """lm-eval's TaskManager over the include dirs (the registry too when a task is named), with
    every task loaded now: an unknown name or a dataset that cannot load fails here, clearly."""
    from lm_eval.tasks import TaskManager

    if specs.names and not specs.include:
        tm = copy.copy(_registry())  # a copy: `load` is replaced below, per call
    else:
        tm = TaskManager(include_path=specs.include or None, include_defaults=bool(specs.names))
    known = set(tm.all_tasks)
    for name in specs.names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise TuneryError(
                f"Unknown benchmark task {name!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
                hint="Name a task from lm-eval's registry (`lm-eval ls tasks`), or pass a task YAML path.",
                param="benchmark",
            )
    try:
        loaded = tm.load(specs.specs)
    except TuneryError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets, the hub, templates: all the user's to fix
        raise TuneryError(
            f"Could not load the benchmark task(s) {', '.join(specs.task_names)}: {exc}",
            hint="Named tasks download their data from the Hugging Face hub; offline, pass a local task "
            "YAML whose data_files point at local files.",
            param="benchmark",
        ) from None
    tm.load = lambda _tasks: loaded  # simple_evaluate asks again: hand it the tasks already loaded
    return tm


def run_benchmark(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's tasks on a loaded model through its HF backend; a JSON-ready summary."""
    require_lm_eval()
    specs = resolve_tasks(split_tasks(tasks))
    with _quiet_lm_eval(verbose):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tm = task_manager(specs)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs.specs,
            task_manager=tm,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return summarize(out, limit=limit)


def summarize(out: dict[str, Any], limit: int | None = None) -> dict[str, Any]:
    """The parts of lm-eval's result worth keeping, plus one flat row per task and metric."""
    rows = []
    samples = out.get("n-samples") or {}
    for task, metrics in (out.get("results") or {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if (
                not comma
                or metric.endswith("_stderr")
                or not isinstance(value, int | float)
                or isinstance(value, bool)
            ):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt or "none",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "n": (samples.get(task) or {}).get("effective"),
                }
            )
    return {
        "rows": rows,
        "results": out.get("results"),
        "groups": out.get("groups"),
        "versions": out.get("versions"),
        "n-shot": out.get("n-shot"),
        "n-samples": samples,
        "higher_is_better": out.get("higher_is_better"),
        "limit": limit,
        "lm_eval_version": out.get("lm_eval_version"),
    }


def primary(summary: dict[str, Any]) -> dict[str, float]:
    """{"task metric": value} for one-number reports (the forgetting probe): acc, else acc_norm,
    else exact_match, else the task's first metric."""
    by_task: dict[str, dict[str, float]] = {}
    for r in summary["rows"]:
        by_task.setdefault(r["task"], {}).setdefault(r["metric"], r["value"])
    out = {}
    for task, metrics in by_task.items():
        key = next((k for k in ("acc", "acc_norm", "exact_match") if k in metrics), next(iter(metrics)))
        out[f"{task} {key}"] = metrics[key]
    return out


def render_benchmark(summary: dict[str, Any], title: str) -> Any:
    """A rich table: one row per task and metric, with its standard error and item count."""
    table = Table(title=title)
    for col, justify in (
        ("task", "left"),
        ("metric", "left"),
        ("value", "right"),
        ("± stderr", "right"),
        ("n", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in summary["rows"]:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        table.add_row(r["task"], metric, f"{r['value']:.4f}", stderr, str(r["n"] or ""))
    return table
