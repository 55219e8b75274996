"""The run's one event stream. Files (events.jsonl, metrics.jsonl, results.csv), the progress bar,
the server and the trackers all subscribe to it; nothing else reports progress."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


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


def write_results(run_dir: Path) -> None:
    """results.csv (OpenAI's columns) and loss.png from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    with open(run_dir / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(RESULT_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r["step"],
                    _fmt(r.get("train_loss")),
                    _fmt(r.get("train_mean_token_accuracy")),
                    _fmt(r.get("valid_loss")),
                    _fmt(r.get("valid_mean_token_accuracy")),
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
