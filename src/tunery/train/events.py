"""The run's one event stream. Files (events.jsonl, metrics.jsonl, results.csv), the progress bar,
the server and the trackers all subscribe to it; nothing else reports progress."""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
# `compute_classification_metrics`: the keys the classification hook (evaluate/run.py::
# classification_eval) adds to an evaluated row, and their columns in OpenAI's results files. F-beta
# keys (`valid_f1`, `valid_f0.5`) become `classification/f1.0`, `classification/f0.5`.
CLASSIFICATION_COLUMNS = {
    "valid_accuracy": "classification/accuracy",
    "valid_weighted_f1": "classification/weighted_f1_score",
    "valid_precision": "classification/precision",
    "valid_recall": "classification/recall",
}
_F_BETA = re.compile(r"valid_f(\d+(?:\.\d+)?)")


class EventLog:
    def __init__(self, run_dir: Path | None, *, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self.subscribers.append(fn)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def emit(
        self, message: str, *, level: str = "info", type: str = "message", data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        event = {
            "created_at": int(time.time()),
            "level": level,
            "type": type,
            "message": message,
            "data": data or {},
        }
        self._append("events.jsonl", event)
        for fn in self.subscribers:
            fn(event)
        return event

    def metrics(self, row: dict[str, Any]) -> None:
        """One logged step: written to metrics.jsonl and as an OpenAI-style metrics event."""
        self._append("metrics.jsonl", row)
        msg = f"Step {row['step']}/{row['total_steps']}: training loss={row['train_loss']:.4f}"
        if row.get("valid_loss") is not None:
            msg += f", validation loss={row['valid_loss']:.4f}"
            tasks = per_task_losses(row)
            if tasks:  # multi-task validation (train/loop.py::evaluate)
                msg += " (" + ", ".join(f"{t} {v:.4f}" for t, v in tasks.items()) + ")"
        self.emit(msg, type="metrics", data=row)

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric rows past the checkpoint, so the files read as one run."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut by a kill mid-write
                continue
    return rows


def per_task_losses(row: dict[str, Any]) -> dict[str, float]:
    """{task: validation loss} of a row from a multi-task validation set; empty for one task."""
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("valid_loss/") and v is not None}


def classification_columns(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{metrics key: results.csv column} of the classification metrics the rows hold, in OpenAI's
    order: accuracy, weighted F1, then (binary tasks) precision, recall and each F-beta by beta."""
    keys = {k for r in rows for k in r}
    out = {k: col for k, col in CLASSIFICATION_COLUMNS.items() if k in keys}
    betas = sorted((float(m.group(1)), k) for k in keys if (m := _F_BETA.fullmatch(k)))
    out.update({k: f"classification/f{beta}" for beta, k in betas})  # f1.0, as OpenAI writes it
    return out


def write_results(run_dir: Path, classification: bool = False) -> None:
    """results.csv (OpenAI's columns) and loss.png from metrics.jsonl. With `classification` (the
    run computed `compute_classification_metrics`), OpenAI's `classification/...` columns follow,
    filled at the evaluated steps and blank elsewhere."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    extra = classification_columns(rows) if classification else {}
    with open(run_dir / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(RESULT_COLUMNS + list(extra.values()))
        for r in rows:
            w.writerow(
                [
                    r["step"],
                    _fmt(r.get("train_loss")),
                    _fmt(r.get("train_mean_token_accuracy")),
                    _fmt(r.get("valid_loss")),
                    _fmt(r.get("valid_mean_token_accuracy")),
                    *(_fmt(r.get(k)) for k in extra),
                ]
            )
    if rows:
        plot_loss(rows, run_dir / "loss.png")


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.6g}"


def plot_loss(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train loss")
    val = [r for r in rows if r.get("valid_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["valid_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
