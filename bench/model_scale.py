"""Bigger than 135M on a laptop (issue 25 §4): `lora` and `qlora` on a random ~1.2B Llama, measured.

    python bench/model_scale.py --shape tiny --steps 2     # smoke run: seconds
    python bench/model_scale.py                            # llama-1b (Llama-3.2-1B's shape), both methods

The model is built once from its config with random weights, saved in bf16 with a byte-level BPE
tokenizer trained on the bench data (`gpu_bench.build_model_dir`, `--shape` is one of
`gpu_bench.SHAPES`), so examples have realistic token counts and loading costs what a real
checkpoint's does. Each method then trains in a child process of its own through `tunery.train.run`
(the path `tunery train` takes) on datasets/chat_bench/train.jsonl for the first `--steps` optimizer
steps of its first epoch (`max_steps`), `--batch-size` examples per step, `--max-length`, and
Tunery's defaults for everything else (auto precision unless `--precision`, packing, LoRA r16 on all
linear layers, the method's learning rate, jemalloc where installed). The defaults (4 steps of 2
examples, max length 512) are sized for the llama-1b run of both methods to take about 12 minutes on
2 quiet cores (extrapolated from the 135M shape; qlora's steps take ~1.7x lora's on a CPU, where
bitsandbytes dequantizes each 4-bit weight for every matmul).

Per method:

- tokens/s: non-padding tokens over the optimizer steps after `--warmup-steps` (each step's tokens
  from Tunery's own schedule, replayed; its seconds from the per-step rate in metrics.jsonl);
- peak RSS: the child's whole-life peak (`ru_maxrss`: loading, quantizing, training, saving);
- minutes per 1,000 examples: 1,000 x the mean token length of datasets/chat_bench/train.jsonl
  (truncated to `--max-length`) over the measured tokens/s: training only, loading not included;
- the memory estimate: `workflows.recommend.estimate`, the function `tunery recommend` (and
  `tunery models info`) predicts peak memory with, given the run's method, precision, max length,
  batch size, micro-batch budget and LoRA rank, and its signed error against the measured peak RSS
  ((estimated - measured) / measured). The dashboard's estimate (`serve/ui_estimate.estimate_job`,
  the same `train/estimate.peak_memory` on the file's counted tokens) is recorded next to it;
- trainable parameters (Tunery's own count at setup) and how the base is stored: the number of
  bitsandbytes `Linear4bit` layers and plain `nn.Linear` base layers of the model the run built, and
  the base's in-memory size (`get_memory_footprint`). A method that fails (bitsandbytes unable to
  quantize on this CPU, say) is reported as failed with its error; no number stands in for it.

The parent records the machine, its CPU flags and RAM, and the fp32/bf16 matmul peaks it measured.
Writes docs/bench/model_scale.{json,md} for llama-1b, `model_scale_<shape>` for any other shape
(`model_scale_tiny`, `model_scale_smollm2_135m`), or the same names under `--out` (the test's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpu_bench  # noqa: E402  (the shapes and the random-model builder: one copy of each)
import train_throughput  # noqa: E402  (the schedule replay and the child environment)

DATA = gpu_bench.DATA
METHODS = ["lora", "qlora"]
MB = 2**20
SETTINGS = ("steps", "batch_size", "max_length", "warmup_steps", "seed", "precision")


# ---------------------------------------------------------------- child side: one method


def base_layers(model: Any) -> dict[str, Any]:
    """How the base's linear layers are stored: bitsandbytes `Linear4bit` (with their quant types)
    against plain `nn.Linear` (the LM head and the adapters' own matrices left out), and the base's
    in-memory size in MB."""
    import torch

    from tunery.models.unwrap import unwrap

    try:
        import bitsandbytes as bnb

        four_bit: type | None = bnb.nn.Linear4bit
    except Exception:  # no bitsandbytes: nothing can be 4-bit
        four_bit = None
    base = unwrap(model)
    n4 = plain = 0
    quant_types: set[str] = set()
    for name, module in base.named_modules():
        if four_bit is not None and isinstance(module, four_bit):
            n4 += 1
            state = getattr(module.weight, "quant_state", None)
            quant_types.add(getattr(state, "quant_type", None) or "unknown")
        elif isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and ".lora_" not in name:
            plain += 1
    return {
        "linear4bit_modules": n4,
        "plain_linear_modules": plain,
        "quant_types": sorted(quant_types),
        "base_memory_mb": round(base.get_memory_footprint() / MB, 1),
    }


@contextlib.contextmanager
def watch_build(found: dict[str, Any]):
    """Record `base_layers` of the model `tunery.train.run` builds, as it builds it: the model the run
    trains, not a reload of the saved adapter. `run` calls `setup.build_model` through the module."""
    from tunery.train import setup

    real = setup.build_model

    def build(*args: Any, **kwargs: Any):
        model, tokenizer = real(*args, **kwargs)
        found.update(base_layers(model))
        return model, tokenizer

    setup.build_model = build
    try:
        yield
    finally:
        setup.build_model = real


def trained_examples(model_dir: str, max_length: int) -> list[dict[str, list[int]]]:
    """The chat_bench rows as the run trains them: encoded and truncated to `max_length`, without
    the ones truncation left nothing to learn from (the sft objective drops those)."""
    examples = common.load_examples(model_dir, DATA, 10**9, max_length)
    return [x for x in examples if any(t != common.IGNORE for t in x["labels"][1:])]


def child(args: argparse.Namespace) -> None:
    import torch

    from tunery.plugins import load_config
    from tunery.train import run
    from tunery.train.events import read_jsonl
    from tunery.train.memory import active_allocator

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sets = [
            f"method={args.method}",
            f"seed={args.seed}",
            "hyperparameters.n_epochs=1",
            f"hyperparameters.max_steps={args.steps}",
            f"hyperparameters.batch_size={args.batch_size}",
            f"hyperparameters.max_length={args.max_length}",
            f"hyperparameters.precision={args.precision}",
        ]
        out = tmp / "run"
        config = load_config(
            None, sets, {"model": args.model_dir, "data.train": str(DATA), "output": str(out)}
        )
        layers: dict[str, Any] = {}
        with watch_build(layers):
            result = run(config)
        peak = common.peak_rss_mb()  # before anything else is loaded here
        events = read_jsonl(out / "events.jsonl")
        started = next(e["data"] for e in events if e.get("message") == "Fine-tuning job started")
        counts = next(e["data"] for e in events if "trainable_parameters" in (e.get("data") or {}))
        rows = read_jsonl(out / "metrics.jsonl")
        train = trained_examples(args.model_dir, args.max_length)
        # The run's own schedule, replayed: the epoch's first `max_steps` steps.
        tokens = train_throughput._step_tokens(train, config)[: args.steps]
    if result.status != "succeeded" or len(tokens) != len(rows) or sum(tokens) != result.trained_tokens:
        raise RuntimeError(f"run {result.status}: replayed {sum(tokens)} tokens, ran {result.trained_tokens}")
    seconds = [n / r["tokens_per_second"] for n, r in zip(tokens, rows, strict=True)]
    rate, tok_n, sec = common.steady_rate(tokens, seconds, args.warmup_steps)
    out_row = {
        "method": args.method,
        "tokens_per_second": rate,
        "measured_tokens": tok_n,
        "measured_seconds": sec,
        "step_tokens": tokens,
        "step_seconds": [round(s, 2) for s in seconds],
        "steps": len(rows),
        "peak_rss_mb": round(peak, 1),
        "max_step_rss_mb": max(r["rss_mb"] for r in rows),
        "trainable_parameters": counts["trainable_parameters"],
        "total_parameters": counts["total_parameters"],
        "precision": started.get("precision"),
        "packed": started.get("packed"),
        "fused": started.get("fused"),
        "learning_rate": started.get("learning_rate"),
        "micro_batch_tokens": config.hyperparameters.micro_batch_tokens,
        "train_loss_first": rows[0]["train_loss"],
        "train_loss_last": rows[-1]["train_loss"],
        "threads": torch.get_num_threads(),
        "allocator": active_allocator(),
        **layers,
    }
    Path(args.result).write_text(json.dumps(out_row))


# ---------------------------------------------------------------- parent side


def lora_rank(method: str) -> int:
    """The method's default rank: what the run trained with, so what the estimate must assume."""
    from tunery.methods import METHODS as REGISTRY

    field = REGISTRY.get(method).options.model_fields.get("r")
    return int(field.default) if field is not None else 8


def predict(model_dir: Path, r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Both of Tunery's memory estimates of the run `r` describes, on the file it trained on: the
    settings it ran with (precision as resolved, the method's default rank), nothing measured."""
    from tunery.models.load import load_tokenizer
    from tunery.serve.ui_estimate import estimate_job
    from tunery.workflows.recommend import data_facts, estimate, model_facts

    est = estimate(
        model_facts(str(model_dir)),
        data_facts(str(DATA), load_tokenizer(str(model_dir))),
        method=r["method"],
        precision=r["precision"],
        max_length=args.max_length,
        batch_size=args.batch_size,
        micro_batch_tokens=r["micro_batch_tokens"],
        lora_r=lora_rank(r["method"]),
    )
    hp = {
        "n_epochs": 1,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": r["precision"],  # as resolved in the run, as recommend is asked above
        "micro_batch_tokens": r["micro_batch_tokens"],
    }
    job = estimate_job(str(model_dir), method=r["method"], data_path=DATA, hyperparameters=hp)
    measured = r["peak_rss_mb"]
    predicted = est.peak_bytes / MB
    dashboard = job["memory_bytes"]["total"] / MB
    return {
        "estimate_mb": round(predicted, 1),
        "estimate_parts_mb": {k: round(v / MB, 1) for k, v in est.parts.items()},
        "estimate_error_pct": round(100 * (predicted - measured) / measured, 1),
        "dashboard_estimate_mb": round(dashboard, 1),
        "dashboard_error_pct": round(100 * (dashboard - measured) / measured, 1),
    }


def mean_example_tokens(model_dir: Path, max_length: int) -> float:
    """Mean tokens per example of the chat_bench training file, as training encodes it."""
    examples = trained_examples(str(model_dir), max_length)
    return sum(len(x["input_ids"]) for x in examples) / len(examples)


def measure(args: argparse.Namespace, model_dir: Path, mean_len: float) -> dict[str, Any]:
    """Every method in its own child; each row gets its estimates and minutes per 1,000 examples."""
    results: dict[str, Any] = {}
    flags = ["--model-dir", str(model_dir), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    flags += ["--max-length", str(args.max_length), "--warmup-steps", str(args.warmup_steps)]
    flags += ["--seed", str(args.seed), "--precision", args.precision]
    for method in args.methods.split(","):
        print(f"{args.shape} / {method}", flush=True)
        r = common.run_child(
            Path(__file__),
            ["--child", method, *flags],
            timeout=args.child_timeout,
            env=train_throughput.child_env("tunery"),
        )
        if "error" in r:
            print(f"{method}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
        else:
            r.update(predict(model_dir, r, args))
            r["minutes_per_1000_examples"] = round(1000 * mean_len / r["tokens_per_second"] / 60, 1)
            print(
                f"{method}: {r['tokens_per_second']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(estimate {r['estimate_mb']:.0f} MB, {r['estimate_error_pct']:+.0f}%), "
                f"{r['minutes_per_1000_examples']} min / 1,000 examples, "
                f"{r['linear4bit_modules']} Linear4bit ({r['wall_seconds']:.0f} s)",
                flush=True,
            )
        results[method] = r
    return results


def markdown(report: dict[str, Any]) -> str:
    m, cpu, s = report["machine"], report["machine"]["cpu"], report["settings"]
    lines = [
        f"# Model scale: {report['shape']} ({report['parameters'] / 1e9:.2f}B parameters, random weights)",
        "",
        f"`{report['command']}`",
        "",
        f"CPU: {cpu['model']}, flags {', '.join(cpu['flags']) or 'none of note'}; {m['threads']} threads, "
        f"{m['memory_gb']} GB RAM. Matmul peaks (this run): fp32 {report['peak_gflops']['fp32']:.0f} GFLOPS, "
        f"bf16 {report['peak_gflops']['bf16']:.0f} GFLOPS. Load average before: {m['load_average']}, "
        f"after: {report['load_average_after']}.",
        f"{s['steps']} optimizer steps of {s['batch_size']} examples of datasets/chat_bench, max length "
        f"{s['max_length']}, precision {s['precision']}, Tunery's defaults otherwise; the first "
        f"{s['warmup_steps']} step(s) left out of tokens/s. Minutes per 1,000 examples at the data's mean "
        f"of {report['mean_example_tokens']:.0f} tokens per example, training only.",
        "",
        "| method | precision | base linears | base in memory MB | trainable | tok/s | min / 1,000 examples "
        "| peak RSS MB | `recommend` estimate MB | error | dashboard estimate MB | load + train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            tail = " ".join(r.get("stderr_tail", "").strip().splitlines()[-1:])[:200]
            lines.append(f"| {name} | failed: {r['error']}: {tail} | | | | | | | | | | |")
            continue
        kinds = (
            f"{r['linear4bit_modules']} Linear4bit ({'/'.join(r['quant_types'])}), "
            if r["linear4bit_modules"]
            else ""
        )
        lines.append(
            f"| {name} | {r['precision']} | {kinds}{r['plain_linear_modules']} plain "
            f"| {r['base_memory_mb']:.0f} | {r['trainable_parameters'] / 1e6:.1f}M "
            f"| {r['tokens_per_second']:.1f} "
            f"| {r['minutes_per_1000_examples']:.1f} | {r['peak_rss_mb']:.0f} | {r['estimate_mb']:.0f} "
            f"| {r['estimate_error_pct']:+.0f}% | {r['dashboard_estimate_mb']:.0f} "
            f"({r['dashboard_error_pct']:+.0f}%) | {r['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        "Error = (estimate - measured peak RSS) / measured. The `recommend` estimate "
        "(`workflows/recommend.py`) and the dashboard's (`serve/ui_estimate.py`) are the same "
        "`train/estimate.py::peak_memory`, runtime included; the dashboard reads the file's token "
        "statistics instead of every length.",
    ]
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> None:
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if args.shape not in gpu_bench.SHAPES or unknown:
        sys.exit(f"unknown shape {args.shape!r} or method(s) {unknown}: {list(gpu_bench.SHAPES)}, {METHODS}")
    rows = sum(1 for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip())
    if args.steps * args.batch_size > rows:  # the steps stay within one epoch of the file
        sys.exit(f"--steps x --batch-size = {args.steps * args.batch_size} examples; {DATA.name} has {rows}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine = {
        **common.machine_info(),
        "memory_gb": round(memory / 2**30, 1),
    }
    peaks = {d: common.matmul_peak(d, seconds=args.peak_seconds) for d in ("fp32", "bf16")}
    print(f"matmul peaks GFLOPS: {peaks}; cpu {machine['cpu']}; load {machine['load_average']}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        model_dir = gpu_bench.build_model_dir(args.shape, Path(t), "cpu")
        from tunery.workflows.recommend import model_facts

        report = {
            "command": "python bench/model_scale.py " + " ".join(sys.argv[1:]),
            "shape": args.shape,
            "dims": gpu_bench.SHAPES[args.shape],
            "parameters": model_facts(str(model_dir)).n_params,
            "machine": machine,
            "peak_gflops": peaks,
            "settings": {k: getattr(args, k) for k in SETTINGS},
            "mean_example_tokens": mean_example_tokens(model_dir, args.max_length),
        }
        report["results"] = measure(args, model_dir, report["mean_example_tokens"])
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "model_scale" if args.shape == "llama-1b" else f"model_scale_{args.shape.replace('-', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1b", help=f"one of {list(gpu_bench.SHAPES)}")
    p.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (auto's choice at 1,000)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of tokens/s")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="Tunery's default: auto"
    )
    p.add_argument("--seed", type=int, default=42, help="tunery train's default")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="time spent on each matmul peak")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per method (default: none)")
    p.add_argument("--out", default=str(common.ROOT / "docs/bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.shape = "tiny"
    if args.child:
        args.method = args.child
        return child(args)
    parent(args)


if __name__ == "__main__":
    main()
