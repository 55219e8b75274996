"""`tunery quickstart`: the main job, offline, on the embedded default model.

Loads smollm2-135m, evaluates it zero-shot and few-shot on the bundled sentiment test set, fine-tunes a
LoRA adapter on the training split, evaluates again, and prints the before/after table. Every step goes
through the same `train.run` and `evaluate.evaluate` the CLI commands use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = ["positive", "negative", "mixed"]


@dataclass
class QuickstartSettings:
    model: str = "smollm2-135m"
    output: str = "runs/quickstart"
    shots: int = 3
    n_epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_train: int | None = None  # smaller budgets (tests)
    max_test: int | None = None
    seed: int = 42


def _row(label: str, res: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "label": label,
        "accuracy": res.get("accuracy"),
        "macro_f1": res.get("macro_f1"),
        "invalid": res.get("invalid"),
        "seconds": round(seconds, 1),
    }


def run_quickstart(s: QuickstartSettings, console) -> dict[str, Any]:
    import torch

    from tunery.cli_common import ProgressPrinter
    from tunery.config import load_config
    from tunery.evaluate.run import build_few_shot, evaluate, load_conversations
    from tunery.methods import load_trained
    from tunery.resources import dataset_file, dataset_subset
    from tunery.train import run

    t_start = time.perf_counter()
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    train = dataset_subset(dataset_file("sentiment", "train"), s.max_train, out / "train.jsonl")
    valid = dataset_file("sentiment", "validation")
    test = dataset_subset(dataset_file("sentiment", "test"), s.max_test, out / "test.jsonl")

    console.rule("[bold]1/4 Load the base model")
    t = time.perf_counter()
    base, tok = load_trained(s.model, None, dtype=torch.float32)
    console.print(f"{s.model} loaded in {time.perf_counter() - t:.1f}s")
    rows = []
    console.rule("[bold]2/4 Evaluate the base model: zero-shot and few-shot")
    t = time.perf_counter()
    zero = evaluate(
        base, tok, test, labels=LABELS, batch_size=16, description="zero-shot", n_shown=0, compute_loss=False
    )
    rows.append(_row(f"{s.model} zero-shot", zero, time.perf_counter() - t))
    t = time.perf_counter()
    shots = build_few_shot(load_conversations(train), s.shots, s.seed)
    few = evaluate(
        base,
        tok,
        test,
        labels=LABELS,
        batch_size=16,
        few_shot=shots,
        description=f"{s.shots}-shot",
        n_shown=0,
        compute_loss=False,
    )
    rows.append(_row(f"{s.model} {s.shots}-shot", few, time.perf_counter() - t))
    del base

    console.rule("[bold]3/4 Fine-tune with LoRA")
    t = time.perf_counter()
    cfg = load_config(
        sets=[
            f"model={s.model}",
            f"data.train={train}",
            f"data.validation={valid}",
            "method=lora",
            f"hyperparameters.n_epochs={s.n_epochs}",
            f"hyperparameters.batch_size={s.batch_size}",
            f"hyperparameters.learning_rate={s.learning_rate}",
            "hyperparameters.max_length=256",
            f"seed={s.seed}",
            f"output={out / 'run'}",
        ]
    )
    printer = ProgressPrinter(console)
    try:
        result = run(cfg, subscribers=[printer])
    finally:
        printer.close()
    train_seconds = time.perf_counter() - t

    console.rule("[bold]4/4 Evaluate the fine-tuned model")
    tuned, tok = load_trained(s.model, str(result.model_dir), dtype=torch.float32)
    t = time.perf_counter()
    after = evaluate(
        tuned,
        tok,
        test,
        labels=LABELS,
        batch_size=16,
        description="fine-tuned",
        n_shown=5,
        compute_loss=False,
    )
    rows.append(_row("LoRA fine-tuned", after, time.perf_counter() - t))
    summary = {
        "rows": rows,
        "train_seconds": round(train_seconds, 1),
        "examples_per_second": after["generation"]["tokens_per_second"]
        and round(after["n"] / max(1e-9, after["generation"]["seconds"]), 2),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "adapter": str(result.model_dir),
        "n_test": after["n"],
        "examples": after["examples"],
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    _print(console, summary, s)
    return summary


def generative_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned generative row, in the shape the head quickstart prints beside its own."""
    last = summary["rows"][-1]
    return {
        "label": "smollm2-135m LoRA, generated label",
        "accuracy": last["accuracy"],
        "macro_f1": last["macro_f1"],
        "train_seconds": summary["train_seconds"],
        "examples_per_second": summary.get("examples_per_second"),
    }


def _print(console, summary: dict[str, Any], s: QuickstartSettings) -> None:
    from rich.table import Table

    table = Table(title=f"Sentiment test set ({summary['n_test']} reviews): before and after fine-tuning")
    for col in ("model", "accuracy", "macro F1", "off-label replies", "eval seconds"):
        table.add_column(col)
    for r in summary["rows"]:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
        invalid = r["invalid"]["count"] if isinstance(r["invalid"], dict) else r["invalid"]
        table.add_row(r["label"], acc, f1, str(invalid), str(r["seconds"]))
    console.print(table)
    for ex in summary["examples"][:3]:
        console.print(
            f"[dim]{ex['prompt'][:90]}[/] -> [bold]{ex['prediction']}[/] (reference {ex['reference']})"
        )
    console.print(f"Training took {summary['train_seconds']}s; everything {summary['total_seconds']}s.")
    adapter = summary["adapter"]
    console.print(f"\nAdapter saved to [bold]{adapter}[/]")
    console.print(f"Chat with it:   tunery chat --model {s.model} --adapter {adapter}")
    console.print(
        "Serve it:       tunery serve  (then use the OpenAI SDK with base_url=http://127.0.0.1:8000/v1)"
    )
    console.print(
        f"Evaluate again: tunery eval --model {s.model} --adapter {adapter} "
        "--data datasets/sentiment/test.jsonl"
    )
