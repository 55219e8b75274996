"""Time to a good model: minutes from "train" to a model that reaches a target test accuracy (issue 20).

    python bench/time_to_quality.py --tiny                     # smoke run on a random tiny model
    python bench/time_to_quality.py                            # smollm2-135m, sentiment and routing

Each task (datasets/sentiment: 3 labels, target 97%; datasets/routing: 5 teams, target 95%) is
trained by every variant, each in its own child process, one after another:

- `tunery-auto`: `tunery.train.run` with the config `tunery train --model M --data train.jsonl`
  builds: every hyperparameter `auto` (OpenAI's rules, but on a CPU from 100 examples at least
  batch 8, with the learning rate scaled linearly: `train/hparams.py`).
- `tunery-recommend`: the same, with what `tunery recommend --memory <this machine's RAM>`
  proposes (method, batch size, learning-rate multiplier, precision, max length, micro-batch tokens).
- `tunery-openai` (not run unless asked for): `auto` under OpenAI's rules on every device
  (`auto_rule: openai`; batch 1 below 750 examples), what `auto` was before issue 20's decision.
- `tunery-batch8` (not run unless asked for): `auto`, but batch 8, the batch the Trainer uses.
  It answers whether `auto`'s batch 1 is what costs the minutes (issue 20's decision on `auto`).
- `tunery-batch8-scaled` (not run unless asked for): batch 8 with batch 1's learning rate scaled
  linearly with the batch (multiplier 0.05 x 8 = 0.4: 8e-4 for LoRA), the same step per example.
- `trainer`: `transformers.Trainer` + peft with the recipe people copy: lr 2e-4, 3 epochs, batch 8,
  linear decay, LoRA r16/alpha32 on all linear layers, loss on the assistant reply only (tokenized
  with Tunery's encoder, as in bench/train_throughput.py), bf16 autocast where Tunery's `auto`
  precision would take it (native bf16 that a matmul probe measures faster), fp32 otherwise.

After every epoch the model is evaluated on the task's test split with `tunery.evaluate.evaluate`,
the function `tunery eval` and the quickstart use: greedy generation, exact match of the label
(accuracy; any other reply counts as wrong). Tunery's epoch models are the checkpoints its loop
writes at every epoch end; the Trainer's is its live model. A variant stops at the first epoch
that reaches the target, or after its epochs.

Two clocks run in each child. Training time runs from the start of training (the call to
`tunery.train.run`, which validates the data and loads the model; for the Trainer, before its
tokenizer and model are loaded) to the end of the epoch, with tokenization, the steps and Tunery's
epoch checkpoints in it, and stops while the model is evaluated. Evaluation time is the `evaluate`
call alone; loading a checkpoint to evaluate it is counted apart and in neither. Minutes to target =
training time to the first epoch at the target + the evaluations it took to know (every epoch's up
to that one). Training-only minutes are reported too. The parent records the machine, its CPU flags
and the fp32/bf16 matmul peaks it measured. Writes docs/bench/time_to_quality.{json,md} (`_tiny`
with --tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput  # noqa: E402  (its Trainer pieces and child environments: one copy of each)

LABELS = {
    "sentiment": ["positive", "negative", "mixed"],
    "routing": ["billing", "technical", "shipping", "account", "sales"],
}
VARIANTS = ["tunery-auto", "tunery-recommend", "trainer"]
OPTIONAL = ["tunery-openai", "tunery-batch8", "tunery-batch8-scaled"]
EVAL_BATCH = 16  # as the quickstart evaluates
TRAINER_RECIPE = {"learning_rate": 2e-4, "epochs": 3, "batch_size": 8, "scheduler": "linear"}


# ---------------------------------------------------------------- child side: one variant, one task


@dataclass
class EpochClock:
    """Training time with evaluation taken out, and one row per evaluated epoch."""

    model_spec: str
    test: list[Any]
    labels: list[str]
    target: float
    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # evaluation and checkpoint loading: not training time
    rows: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, model: Any, tokenizer: Any, load_seconds: float = 0.0) -> dict[str, Any]:
        """Score `model` on the test split at the end of the next epoch; True in `reached` at target."""
        from tunery.evaluate.run import evaluate

        train_seconds = time.perf_counter() - self.start - self.excluded - load_seconds
        t0 = time.perf_counter()
        res = evaluate(
            model,
            tokenizer,
            self.test,
            labels=self.labels,
            batch_size=EVAL_BATCH,
            progress=False,
            compute_loss=False,
            n_shown=0,
        )
        eval_seconds = time.perf_counter() - t0
        self.excluded += load_seconds + eval_seconds
        invalid = res["invalid"]["count"] if isinstance(res["invalid"], dict) else res["invalid"]
        row = {
            "epoch": len(self.rows) + 1,
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "load_seconds": round(load_seconds, 2),
            "accuracy": res["accuracy"],
            "macro_f1": res["macro_f1"],
            "invalid": invalid,
            "reached": res["accuracy"] >= self.target,
        }
        self.rows.append(row)
        print(
            f"  epoch {row['epoch']}: accuracy {row['accuracy']:.3f} after {train_seconds:.0f} s", flush=True
        )
        return row


class TuneryEpochs:
    """An event subscriber: evaluates the checkpoint Tunery writes at each epoch end, and stops the
    run once the target is reached. The stop is the loop's own Ctrl-C path (finish the step, write
    a checkpoint, return `interrupted`): what a user watching the accuracy would do."""

    def __init__(self, clock: EpochClock, run_dir: Path) -> None:
        self.clock, self.run_dir = clock, run_dir
        self.stopped = False
        self.started: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("message") == "Fine-tuning job started":
            self.started = dict(data)
        if data.get("kind") != "checkpoint" or self.stopped:
            return
        row = self.clock.evaluate(
            *load_for_eval(self.clock.model_spec, self.run_dir / data["path"] / "model")
        )
        if row["reached"]:
            self.stopped = True
            os.kill(os.getpid(), signal.SIGINT)


def load_for_eval(spec: str, model_dir: Path) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds to load): the saved adapter on its base, fp32, as `tunery eval` loads."""
    import torch

    from tunery.methods import load_trained

    t0 = time.perf_counter()
    model, tok = load_trained(spec, str(model_dir), dtype=torch.float32)
    return model, tok, time.perf_counter() - t0


def tunery_sets(variant: str, path: str, train_path: Path, args: argparse.Namespace) -> list[str]:
    """The `--set` overrides of a variant on top of `tunery train --model M --data F`."""
    sets = [f"seed={args.seed}"]
    if args.max_epochs:
        sets.append(f"hyperparameters.n_epochs={args.max_epochs}")
    if variant == "tunery-openai":  # OpenAI's rules on every device: batch 1 below 750 examples
        sets.append("hyperparameters.auto_rule=openai")
    if variant.startswith("tunery-batch8"):
        sets.append("hyperparameters.batch_size=8")
    if variant == "tunery-batch8-scaled":  # batch 1's multiplier (0.05) scaled linearly with the batch
        sets.append("hyperparameters.learning_rate_multiplier=0.4")
    if variant == "tunery-recommend":
        from tunery.workflows.recommend import recommend

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        rec = recommend(path, str(train_path), memory)
        chosen = rec.chosen
        if chosen is None:
            raise RuntimeError(f"tunery recommend found nothing that fits in {memory / 2**30:.1f} GiB")
        sets += [
            f"method={chosen.method}",
            f"hyperparameters.batch_size={chosen.batch_size}",
            f"hyperparameters.learning_rate_multiplier={rec.learning_rate_multiplier}",
            f"hyperparameters.precision={chosen.precision}",
            f"hyperparameters.max_length={chosen.max_length}",
            f"hyperparameters.micro_batch_tokens={chosen.micro_batch_tokens}",
        ]
    return sets


def run_tunery(
    variant: str, path: str, train_path: Path, clock: EpochClock, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    from tunery.plugins import load_config
    from tunery.train import run

    t0 = time.perf_counter()
    sets = tunery_sets(variant, path, train_path, args)
    recommend_seconds = time.perf_counter() - t0
    out = tmp / "run"
    config = load_config(None, sets, {"model": path, "data.train": str(train_path), "output": str(out)})
    watcher = TuneryEpochs(clock, out)
    clock.start = time.perf_counter()  # `tunery train` starts here: recommend is run before it
    result = run(config, subscribers=[watcher])
    if result.status == "succeeded" and not watcher.stopped:  # the last epoch writes the model, no checkpoint
        clock.evaluate(*load_for_eval(path, result.model_dir))
    s = watcher.started
    return {
        "settings": {
            "sets": sets,
            "batch_size": s.get("batch_size"),
            "learning_rate": s.get("learning_rate"),
            "n_epochs": s.get("n_epochs"),
            "total_steps": s.get("total_steps"),
            "precision": s.get("precision"),
            "packed": s.get("packed"),
            "scheduler": config.hyperparameters.lr_scheduler,
        },
        "recommend_seconds": round(recommend_seconds, 2),
        "status": result.status if not watcher.stopped else "stopped at target",
    }


def run_trainer(path: str, train_path: Path, clock: EpochClock, args: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from datasets import Dataset
    from tunery.models import load_tokenizer
    from tunery.train.precision import auto_bf16_on_cpu

    clock.start = time.perf_counter()
    tok = load_tokenizer(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), train_throughput.lora_config()
    )
    train = common.load_examples(path, train_path, 10**9, 1024)

    class EpochEval(TrainerCallback):
        def on_epoch_end(self, targs, state, control, model=None, **kw):
            if clock.evaluate(model, tok)["reached"]:
                control.should_training_stop = True

    epochs = args.max_epochs or TRAINER_RECIPE["epochs"]
    targs = TrainingArguments(
        output_dir=str(tmp / "out"),
        num_train_epochs=epochs,
        per_device_train_batch_size=TRAINER_RECIPE["batch_size"],
        learning_rate=TRAINER_RECIPE["learning_rate"],
        lr_scheduler_type=TRAINER_RECIPE["scheduler"],
        bf16=auto_bf16_on_cpu(),  # the rule Tunery's `auto` precision follows
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(train),
        data_collator=train_throughput.pad_collator(pad_id),
        callbacks=[EpochEval()],
    )
    trainer.train()
    steps_per_epoch = -(-len(train) // TRAINER_RECIPE["batch_size"])
    return {
        "settings": {
            "batch_size": TRAINER_RECIPE["batch_size"],
            "learning_rate": TRAINER_RECIPE["learning_rate"],
            "n_epochs": epochs,
            "total_steps": steps_per_epoch * epochs,
            "precision": "bf16" if targs.bf16 else "fp32",
            "packed": False,
            "scheduler": TRAINER_RECIPE["scheduler"],
        },
        "status": "stopped at target" if clock.rows and clock.rows[-1]["reached"] else "succeeded",
    }


def child(args: argparse.Namespace) -> None:
    import torch

    from tunery.evaluate.run import load_conversations
    from tunery.resources import dataset_subset as subset  # the quickstart's --max-train cut: one copy of it
    from tunery.train.memory import active_allocator

    data = common.ROOT / "datasets" / args.task
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        path = train_throughput.model_dir(args.model, tmp)
        train_path = subset(data / "train.jsonl", args.train_limit, tmp / "train.jsonl")
        test = load_conversations(data / "test.jsonl")[: args.test_limit]
        n_train = sum(1 for ln in train_path.read_text(encoding="utf-8").splitlines() if ln.strip())
        clock = EpochClock(path, test, LABELS[args.task], args.target)
        if args.child == "trainer":
            out = run_trainer(path, train_path, clock, args, tmp)
        else:
            out = run_tunery(args.child, path, train_path, clock, args, tmp)
    out.update(
        {
            "epochs": clock.rows,
            "n_train": n_train,
            "n_test": len(test),
            "peak_rss_mb": round(common.peak_rss_mb()),
            "threads": torch.get_num_threads(),
            "allocator": active_allocator(),
        }
    )
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent side: every task and variant


def to_target(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Minutes to the first epoch at the target: its training time plus every evaluation up to it."""
    evals = 0.0
    for row in rows:
        evals += row["eval_seconds"]
        if row["reached"]:
            return {
                "epoch": row["epoch"],
                "minutes": round((row["train_seconds"] + evals) / 60, 2),
                "train_minutes": round(row["train_seconds"] / 60, 2),
            }
    return None


def compare(results: dict[str, dict[str, Any]]) -> None:
    """Each Tunery variant's minutes to target as a share of the Trainer's (issue 20: under half)."""
    ref = (results.get("trainer") or {}).get("to_target")
    for name, r in results.items():
        mine = r.get("to_target")
        r["vs_trainer"] = (
            round(mine["minutes"] / ref["minutes"], 2) if mine and ref and name != "trainer" else None
        )


def child_args(args: argparse.Namespace, variant: str, task: str) -> list[str]:
    target = args.target_sentiment if task == "sentiment" else args.target_routing
    out = ["--child", variant, "--task", task, "--model", args.model, "--target", str(target)]
    out += ["--seed", str(args.seed)]
    for flag, value in (
        ("--max-epochs", args.max_epochs),
        ("--test-limit", args.test_limit),
        ("--train-limit", args.train_limit),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def run_task(args: argparse.Namespace, task: str, variants: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for v in variants:
        print(f"{task} / {v}", flush=True)
        r = common.run_child(Path(__file__), child_args(args, v, task), env=train_throughput.child_env(v))
        if "error" in r:
            print(f"{task} / {v}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
        else:
            r["to_target"] = to_target(r["epochs"])
            best = max((row["accuracy"] for row in r["epochs"]), default=None)
            r["best_accuracy"] = best
            hit = r["to_target"]
            print(
                f"{task} / {v}: best accuracy {best}, "
                + (f"target at epoch {hit['epoch']} in {hit['minutes']} min" if hit else "target not reached")
                + f" ({r['wall_seconds']:.0f} s in all)",
                flush=True,
            )
        results[v] = r
    compare(results)
    target = args.target_sentiment if task == "sentiment" else args.target_routing
    return {"target": target, "results": results}


def fmt_minutes(hit: dict[str, Any] | None, key: str) -> str:
    return f"{hit[key]:.1f} (epoch {hit['epoch']})" if hit else "not reached"


def task_markdown(task: str, t: dict[str, Any]) -> list[str]:
    lines = [
        f"## {task}: target {100 * t['target']:.0f}% test accuracy",
        "",
        "| variant | batch | learning rate | epochs (steps) | precision | accuracy per epoch "
        "| minutes to target (training + eval) | training-only minutes | vs trainer | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in t["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | |")
            continue
        s, hit = r["settings"], r["to_target"]
        accs = " / ".join(f"{100 * row['accuracy']:.1f}%" for row in r["epochs"]) or "-"
        ratio = f"{r['vs_trainer']:.2f}x" if r.get("vs_trainer") is not None else "-"
        lines.append(
            f"| {name} | {s['batch_size']} | {s['learning_rate']:.2g} | {s['n_epochs']} ({s['total_steps']}) "
            f"| {s['precision']} | {accs} | {fmt_minutes(hit, 'minutes')} "
            f"| {fmt_minutes(hit, 'train_minutes')} "
            f"| {ratio} | {r['peak_rss_mb']} |"
        )
    lines += ["", "| variant | epoch | training minutes (cumulative) | eval seconds | accuracy | off-label |"]
    lines.append("|---|---|---|---|---|---|")
    for name, r in t["results"].items():
        for row in r.get("epochs", []):
            lines.append(
                f"| {name} | {row['epoch']} | {row['train_seconds'] / 60:.2f} | {row['eval_seconds']:.1f} "
                f"| {100 * row['accuracy']:.1f}% | {row['invalid']} |"
            )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    m, cpu = report["machine"], report["machine"]["cpu"]
    lines = [
        f"# Time to a good model: {report['model']}",
        "",
        f"`{report['command']}`",
        "",
        f"CPU: {cpu['model']}, flags {', '.join(cpu['flags']) or 'none of note'}; {m['threads']} threads. "
        f"Matmul peaks (this run): fp32 {report['peak_gflops']['fp32']:.0f} GFLOPS, bf16 "
        f"{report['peak_gflops']['bf16']:.0f} GFLOPS. Load average before: {m['load_average']}, after: "
        f"{report['load_average_after']}. Each epoch is evaluated on the test split (greedy generation, "
        "exact match of the label); minutes to target = training time to that epoch plus every "
        "evaluation up to it. Issue 20's bar: Tunery's defaults reach the target in under half the "
        "Trainer's minutes (vs trainer < 0.50x).",
        "",
    ]
    for task, t in report["tasks"].items():
        lines += task_markdown(task, t)
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> None:
    tasks = args.tasks.split(",")
    variants = VARIANTS + OPTIONAL if args.variants == "all" else args.variants.split(",")
    bad = [t for t in tasks if t not in LABELS] + [v for v in variants if v not in VARIANTS + OPTIONAL]
    if bad:
        sys.exit(f"unknown task(s) or variant(s) {bad}; tasks {list(LABELS)}, variants {VARIANTS + OPTIONAL}")
    machine = common.machine_info()
    peaks = {d: common.matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmul peaks GFLOPS: {peaks}; cpu {machine['cpu']}; load {machine['load_average']}", flush=True)
    report = {
        "command": "python bench/time_to_quality.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "machine": machine,
        "peak_gflops": peaks,
        "trainer_recipe": TRAINER_RECIPE,
        "tasks": {task: run_task(args, task, variants) for task in tasks},
    }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "time_to_quality_tiny" if args.model == "tiny" else "time_to_quality"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a model spec (default smollm2-135m)")
    p.add_argument("--tasks", default="sentiment,routing", help="comma-separated: sentiment, routing")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated of {VARIANTS + OPTIONAL}, or all"
    )
    p.add_argument("--target-sentiment", type=float, default=0.97, help="test accuracy to reach on sentiment")
    p.add_argument("--target-routing", type=float, default=0.95, help="test accuracy to reach on routing")
    p.add_argument("--max-epochs", type=int, help="epochs for every variant (default: each its own)")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test rows only")
    p.add_argument("--train-limit", type=int, help="train on the first N training rows only")
    p.add_argument("--seed", type=int, default=42, help="seed of every variant (tunery train's default)")
    p.add_argument("--tiny", action="store_true", help="smoke run: a random tiny model and small limits")
    p.add_argument("--out", default=str(common.ROOT / "docs/bench"))
    for hidden in ("--child", "--task", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:  # a minute in all: a random 2-layer model, a few rows, two epochs
        args.model = "tiny"
        args.train_limit = args.train_limit or 24
        args.test_limit = args.test_limit or 8
        args.max_epochs = args.max_epochs or 2
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
