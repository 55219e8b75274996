"""The method table: every tuning method on the quickstart task (datasets/sentiment), same budget.

    python bench/methods.py                                   # tiny random model: checks the pipeline
    python bench/methods.py --model smollm2-135m --train 64 --steps 16 --test 45

Each method runs in its own child process (peak memory is the child's whole-life peak RSS) through
the one training path, `tunery.train.run`, with the same data, steps, batch size and precision; the
learning rate is the method's own base rate (`tunery methods`). The trained model then answers the
test split through `tunery.evaluate` (greedy, exact label match) and accuracy is reported.
Columns: method, trainable parameters (%), peak memory (MB), tokens/s (training, mean over logged
steps after the first), test accuracy, minutes (training + evaluation wall time).

Writes docs/bench/methods.{json,md} (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_info, peak_rss_mb, run_child  # noqa: E402

DEFAULT_METHODS = [
    "full",
    "freeze",
    "lora",
    "qlora",
    "adalora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "adapter",
    "unipelt",
    "moe_lora",
]


def child(args: argparse.Namespace) -> dict:
    """One method: train, evaluate, report. Runs in a fresh interpreter."""
    import torch

    from tunery.data import load_dataset
    from tunery.evaluate.run import classification_eval
    from tunery.methods import load_trained
    from tunery.models.unwrap import unwrap
    from tunery.plugins import load_config
    from tunery.train import run
    from tunery.train.events import read_jsonl

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    train = work / "train.jsonl"
    rows = (ROOT / "datasets/sentiment/train.jsonl").read_text().splitlines()[: args.train]
    train.write_text("\n".join(rows) + "\n")
    sets = {
        "model": args.model,
        "data.train": str(train),
        "output": str(work / f"run-{args.method}"),
        "method": args.method,
        "hyperparameters.precision": args.precision,
        "hyperparameters.batch_size": args.batch_size,
        "hyperparameters.n_epochs": 100,
        "hyperparameters.max_steps": args.steps,
        "hyperparameters.max_length": 256,
    }
    t0 = time.perf_counter()
    result = run(load_config(sets=[f"{k}={v}" for k, v in sets.items()]))
    train_seconds = time.perf_counter() - t0
    events = read_jsonl(result.output_dir / "events.jsonl")
    counts = next(e["data"] for e in events if "trainable_parameters" in e["data"])
    metrics = read_jsonl(result.output_dir / "metrics.jsonl")
    rates = [r["tokens_per_second"] for r in metrics[1:]] or [metrics[0]["tokens_per_second"]]
    train_peak = peak_rss_mb()

    model, tokenizer = load_trained(args.model, str(result.model_dir))
    # Peak RSS includes the interpreter, the libraries and load-time transients (a 4-bit base is
    # quantized from full-precision tensors while loading); the loaded model's own bytes are the
    # steady-state difference between methods such as lora and qlora.
    base = unwrap(model)
    footprint = base.get_memory_footprint() / 2**20
    test = load_dataset(ROOT / "datasets/sentiment/test.jsonl", kind="chat").examples[: args.test]
    scores = classification_eval(model, tokenizer, test, batch_size=8, max_new_tokens=4)
    return {
        "method": args.method,
        "trainable_parameters": counts["trainable_parameters"],
        "total_parameters": counts["total_parameters"],
        "trainable_percent": 100 * counts["trainable_parameters"] / counts["total_parameters"],
        "peak_memory_mb": train_peak,
        "model_memory_mb": footprint,
        "tokens_per_second": sum(rates) / len(rates),
        "test_accuracy": scores.get("valid_accuracy", scores["valid_exact_match"]),
        "train_loss_first": metrics[0]["train_loss"],
        "train_loss_last": metrics[-1]["train_loss"],
        "train_minutes": train_seconds / 60,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| method | trainable % | peak memory (MB) | tokens/s | test accuracy | loss first → last "
        "| minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_percent']:.3f} | {r['peak_memory_mb']:.0f} | "
            f"{r['tokens_per_second']:.0f} | {r['test_accuracy']:.3f} | "
            f"{r['train_loss_first']:.3f} → {r['train_loss_last']:.3f} | {r['wall_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Model spec (default: a tiny random Llama).")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--train", type=int, default=64, help="Training examples (first N of train.jsonl).")
    p.add_argument("--test", type=int, default=45, help="Test examples (first N of test.jsonl).")
    p.add_argument("--steps", type=int, default=12, help="Optimizer steps per method.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=str(ROOT / "docs/bench/methods"), help="Output prefix (.json, .md).")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.helpers.tiny import make_tiny_model_dir

            model = str(make_tiny_model_dir(Path(tmp) / "tiny", "llama"))
        results = []
        for method in args.methods.split(","):
            child_args = [
                "--child",
                "--method",
                method,
                "--model",
                model,
                "--workdir",
                tmp,
                "--train",
                str(args.train),
                "--test",
                str(args.test),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--precision",
                args.precision,
                "--threads",
                str(args.threads),
            ]
            r = run_child(Path(__file__), child_args, timeout=args.timeout)
            r.setdefault("method", method)
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)

    report = {
        "model": args.model or "tiny random llama (pipeline check, not a quality measurement)",
        "task": "datasets/sentiment",
        "train_examples": args.train,
        "test_examples": args.test,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "machine": machine_info(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    header = (
        f"# Methods on {report['task']} with {report['model']}\n\n"
        f"{args.train} training examples, {args.steps} steps of batch {args.batch_size}, "
        f"precision {args.precision}, each method at its own base learning rate; "
        f"accuracy on the first {args.test} test examples (greedy, exact label).\n\n"
    )
    out.with_suffix(".md").write_text(header + table(results) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
