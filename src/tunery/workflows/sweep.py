"""`tunery sweep CONFIG`: many trainings of one base config, each evaluated, summarised in one table.

Sweep file (YAML):

    base: train.yaml                 # a config file, or the config inline as a mapping
    eval_data: test.jsonl            # chat examples every trial is evaluated on
    metric: accuracy                 # any key of evaluate()'s result; loss/perplexity are minimised
    output: sweeps/first             # trials go to <output>/trial-NNN/
    data_fractions: [0.1, 0.25, 0.5, 1.0]      # data scaling (omit for 1.0 only)
    grid:                            # cartesian product of dotted config keys
      hyperparameters.learning_rate: [1e-4, 3e-4]
      lora.r: [8, 16]
    optuna: {n_trials: 8, space: {hyperparameters.learning_rate: [1e-5, 1e-3, log], lora.r: [4, 32, int]}}
    max_eval: 200                    # evaluate on at most this many examples

Each trial is `train.run` then `evaluate` of the trained model. Results: sweep.csv, sweep.md (the
table), sweep.png (metric against data size, one line per grid point; or per trial), best.yaml (the
best trial's resolved config) and sweep.json.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunery.config import apply_set, read_yaml_mapping
from tunery.data.readers import read_records
from tunery.errors import ConfigError, TuneryError
from tunery.evaluate.run import evaluate, load_conversations
from tunery.methods import load_trained
from tunery.plugins import validate
from tunery.train import run

MINIMIZE = {"loss", "perplexity", "invalid"}


@dataclass
class SweepSpec:
    base: dict[str, Any]
    eval_data: str
    metric: str = "loss"
    output: str = "sweeps/latest"
    data_fractions: list[float] = field(default_factory=lambda: [1.0])
    grid: dict[str, list[Any]] = field(default_factory=dict)
    optuna: dict[str, Any] | None = None
    max_eval: int | None = 200
    eval_batch_size: int = 8


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    raw = read_yaml_mapping(p, "Sweep file")
    allowed = set(SweepSpec.__dataclass_fields__)
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{p}: unknown sweep key(s) {sorted(unknown)}; expected {sorted(allowed)}")
    base = raw.get("base") or {}
    if isinstance(base, str):
        bp = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        if not bp.is_file():
            raise ConfigError(f"{p}: base config {raw['base']} not found", param="base")
        base = read_yaml_mapping(bp)
    if not raw.get("eval_data"):
        raise ConfigError(
            f"{p}: eval_data is required (the file every trial is evaluated on)", param="eval_data"
        )
    fractions = raw.get("data_fractions") or [1.0]
    if any(not (0 < float(f) <= 1) for f in fractions):
        raise ConfigError(f"{p}: data_fractions must be in (0, 1], got {fractions}", param="data_fractions")
    for key, values in (raw.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid.{key} must be a non-empty list", param=f"grid.{key}")
    spec = SweepSpec(**{**raw, "base": base, "data_fractions": [float(f) for f in fractions]})
    return spec


def _config_dict(base: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    raw = json.loads(json.dumps(base))
    for key, value in sets.items():
        apply_set(raw, f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return raw


def subset_file(train: str, fraction: float, seed: int, out: Path) -> tuple[Path, int]:
    """The first `fraction` of a fixed shuffle of the records, so a smaller subset is always
    contained in a larger one (the scaling curve then measures data size, not sampling luck)."""
    records = [rec for _, rec in read_records(train).records]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(len(records) * fraction))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for i in order[:k]:
            fh.write(json.dumps(records[i], ensure_ascii=False) + "\n")
    return out, k


def _eval_examples(spec: SweepSpec):
    convs = load_conversations(spec.eval_data)
    return convs[: spec.max_eval] if spec.max_eval else convs


def run_trial(spec: SweepSpec, index: int, sets: dict[str, Any], fraction: float, evals) -> dict[str, Any]:
    """Train and evaluate one trial; a failed trial is recorded, not fatal to the sweep."""
    trial_dir = Path(spec.output) / f"trial-{index:03d}"
    raw = _config_dict(spec.base, sets)
    train = (raw.get("data") or {}).get("train")
    if not isinstance(train, str):
        raise ConfigError("sweep: base config needs data.train (one file)", param="data.train")
    row: dict[str, Any] = {"trial": index, "fraction": fraction, **sets}
    if fraction < 1.0:
        path, n = subset_file(train, fraction, raw.get("seed", 42), trial_dir / "train.jsonl")
        raw["data"]["train"] = str(path)
    else:
        n = len(read_records(train))
    raw["output"] = str(trial_dir / "run")
    row["n_train"] = n
    try:
        config = _validate(raw)
        result = run(config)
        model, tokenizer = load_trained(None, str(result.model_dir))
        scores = evaluate(model, tokenizer, evals, batch_size=spec.eval_batch_size, progress=False)
    except TuneryError as exc:
        return {**row, "status": "failed", "error": exc.message, spec.metric: None}
    row.update(status=result.status, run_dir=str(result.output_dir), trained_tokens=result.trained_tokens)
    for key in ("loss", "perplexity", "accuracy", "macro_f1", "exact_match", "chrf", "rouge_l"):
        row[key] = scores.get(key)
    row[spec.metric] = scores.get(spec.metric)
    (trial_dir / "eval.json").write_text(
        json.dumps({k: v for k, v in scores.items() if k != "predictions"}, indent=2, default=str)
    )
    return row


def _validate(raw: dict[str, Any]):
    try:
        return validate(raw)  # the option blocks through the registries, in the same pass
    except ValidationError as exc:
        raise ConfigError(
            f"sweep trial config is invalid: {exc.errors()[0]['msg']} at "
            f"{'.'.join(str(x) for x in exc.errors()[0]['loc'])}"
        ) from None


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))] or [
        {}
    ]


def better(a: float | None, b: float | None, metric: str) -> bool:
    if a is None:
        return False
    if b is None:
        return True
    return a < b if metric in MINIMIZE else a > b


def run_sweep(spec: SweepSpec) -> dict[str, Any]:
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    evals = _eval_examples(spec)
    rows: list[dict[str, Any]] = []
    if spec.optuna:
        rows = _optuna(spec, evals)
    else:
        index = 0
        for point in grid_points(spec.grid):
            for fraction in spec.data_fractions:
                rows.append(run_trial(spec, index, point, fraction, evals))
                index += 1
    best = None
    for r in rows:
        if r.get("status") == "succeeded" and (
            best is None or better(r[spec.metric], best[spec.metric], spec.metric)
        ):
            best = r
    write_outputs(spec, rows, best)
    return {"rows": rows, "best": best, "output": str(out)}


def _optuna(spec: SweepSpec, evals) -> list[dict[str, Any]]:
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweep: `optuna:` needs the optuna package.", hint="pip install optuna") from None
    rows: list[dict[str, Any]] = []
    space = spec.optuna.get("space") or {}

    def objective(trial: Any) -> float:
        sets = {}
        for key, bounds in space.items():
            lo, hi, *kind = bounds
            if kind and kind[0] == "int":
                sets[key] = trial.suggest_int(key, int(lo), int(hi))
            elif isinstance(lo, list) or (kind and kind[0] == "choice"):
                sets[key] = trial.suggest_categorical(key, lo if isinstance(lo, list) else [lo, hi])
            else:
                sets[key] = trial.suggest_float(
                    key, float(lo), float(hi), log=bool(kind and kind[0] == "log")
                )
        row = run_trial(spec, trial.number, sets, spec.data_fractions[-1], evals)
        rows.append(row)
        value = row.get(spec.metric)
        return float("nan") if value is None else float(value)

    study = optuna.create_study(direction="minimize" if spec.metric in MINIMIZE else "maximize")
    study.optimize(objective, n_trials=int(spec.optuna.get("n_trials", 8)))
    return rows


def write_outputs(spec: SweepSpec, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    out = Path(spec.output)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    cols = ["trial", "fraction", "n_train", *spec.grid, spec.metric, "status"]
    cols = list(dict.fromkeys(c for c in cols if any(c in r for r in rows)))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mark = " **best**" if best is r else ""
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + f" |{mark}")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(
        json.dumps({"metric": spec.metric, "rows": rows, "best": best}, indent=2, default=str)
    )
    if best is not None:
        cfg = Path(best["run_dir"]) / "config.yaml"
        (out / "best.yaml").write_text(cfg.read_text() if cfg.exists() else yaml.safe_dump(best))
    plot(spec, rows, out / "sweep.png")


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def plot(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [r for r in rows if r.get(spec.metric) is not None]
    if len(spec.data_fractions) > 1:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            label = ", ".join(f"{k}={r[k]}" for k in spec.grid) or spec.metric
            series.setdefault(label, []).append(r)
        for label, rs in series.items():
            rs.sort(key=lambda r: r["n_train"])
            ax.plot([r["n_train"] for r in rs], [r[spec.metric] for r in rs], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.legend(fontsize=8)
    else:
        ax.bar([str(r["trial"]) for r in ok], [r[spec.metric] for r in ok])
        ax.set_xlabel("trial")
    ax.set_ylabel(spec.metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
