"""GPU training bench (issue 24): Tunery against transformers.Trainer + peft and TRL's SFTTrainer.

    python bench/gpu_bench.py info                          # device, versions, measured bf16 matmul peak
    python bench/gpu_bench.py bench                         # both shapes, three stacks (bench/gpu_check.sh)
    python bench/gpu_bench.py bench --device cpu --tiny     # the same code paths on a CPU, in a minute

The hubs are unreachable on the GPU machine, so each model is built from its config with random
weights and saved in bf16 (as the real checkpoints are): the SmolLM2-135M shape and a ~1.2B Llama
shape (Llama-3.2-1B's). The tokenizer is a byte-level BPE trained on the bench data, so examples
have realistic token counts. Every stack trains one epoch over the same examples of
datasets/chat_bench with the same LoRA (r16, alpha 32, all linear layers), examples per step,
learning rate (constant) and clipping, each in a child process of its own:

- `trainer`: `transformers.Trainer` + peft tuned: fp32 weights with bf16 autocast, dynamic padding,
  no gradient checkpointing.
- `trl`: TRL `SFTTrainer` with its defaults (bf16 weights, padding, gradient checkpointing on, loss on
  every token); only the schedule, batch, LoRA and length are set as for the others.
- `tunery`: `tunery.train.run` with its defaults (frozen bf16 base on the GPU, packed rows through
  the varlen kernel, LM head only at supervised positions, fused LoRA layers).

Per stack: non-padding tokens/s after `--warmup-steps`, peak GPU memory (`max_memory_allocated`
during training), MFU against the bf16 matmul peak measured here, the last training loss, and a
held-out loss measured identically for all (fp32, one example at a time). Writes
`<out>/gpu_info.json` and `<out>/gpu_train.{json,md}`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput as tt  # noqa: E402 - its Trainer callbacks and collators are reused

DATA = common.ROOT / "datasets/chat_bench/train.jsonl"
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
VARIANTS = ["trainer", "trl", "tunery"]
# Targets of issue 24 against the tuned Trainer.
TARGETS = {"speedup": 2.0, "memory_ratio": 0.5, "mfu_1b": 0.40, "loss_within": 0.02}


# ---------------------------------------------------------------- machine


def matmul_peak_tflops(device: str, seconds: float = 2.0) -> float:
    """Sustained bf16 TFLOP/s of a large square matmul on `device` (best of timed repetitions)."""
    import torch

    if device == "cpu":
        return common.matmul_peak("bf16", seconds=seconds) / 1e3
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while time.perf_counter() < deadline:
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def info(device: str) -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "tunery"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out: dict[str, Any] = {"device": device, "versions": versions, "cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            gpus=torch.cuda.device_count(),
        )
    out["bf16_matmul_tflops"] = matmul_peak_tflops(device)
    return out


# ---------------------------------------------------------------- models and data


def build_model_dir(shape: str, root: Path, device: str) -> Path:
    """A random-weight causal LM of `shape` saved in bf16, with a BPE tokenizer trained on the data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tiny import tiny_tokenizer
    from tunery.data import load_dataset

    path = root / shape
    convs = load_dataset(DATA, kind="chat").examples
    texts = [str(m.get("content") or "") for c in convs for m in c.messages]
    dims = SHAPES[shape]
    tok = tiny_tokenizer(vocab_size=min(16384, dims["vocab_size"]), corpus=texts)
    cfg = LlamaConfig(
        **dims,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.2B weights on a GPU takes a second, on a CPU a minute
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


# ---------------------------------------------------------------- child side: one stack


def _trainer_args(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        seed=args.seed,
        dataloader_num_workers=0,
    )


def run_trainer(args: argparse.Namespace, train: list[dict], tmp: Path) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model = get_peft_model(model, tt.lora_config())
    targs = TrainingArguments(
        bf16=args.device == "cuda",
        gradient_checkpointing=False,
        remove_unused_columns=False,
        **_trainer_args(args, tmp),
    )
    clock, tokens = tt.StepClock(), []
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=tt.counting(tt.pad_collator(tok.pad_token_id), tokens),
        callbacks=[clock.callback],
    )
    trainer.train()
    return _hf_result(trainer, clock, tokens, args)


def run_trl(args: argparse.Namespace, train: list[dict], tmp: Path) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    sargs = SFTConfig(max_length=args.max_length, **_trainer_args(args, tmp))
    clock, tokens = tt.StepClock(), []
    trainer = SFTTrainer(
        model=args.model_dir,  # TRL loads it as it would any checkpoint: its defaults
        args=sargs,
        train_dataset=Dataset.from_list([{"input_ids": x["input_ids"]} for x in train]),
        peft_config=tt.lora_config(),
        callbacks=[clock.callback],
    )
    trainer.data_collator = tt.counting(trainer.data_collator, tokens)
    trainer.train()
    return _hf_result(trainer, clock, tokens, args)


def _hf_result(trainer: Any, clock: Any, tokens: list[int], args: argparse.Namespace) -> dict[str, Any]:
    rate, tok_n, sec = common.steady_rate(tokens, clock.seconds, args.warmup_steps)
    return {
        "model": trainer.model,
        "tokens_per_second": rate,
        "measured_tokens": tok_n,
        "measured_seconds": sec,
        "steps": len(clock.seconds),
        "train_loss_last": clock.losses[-1] if clock.losses else None,
        "precision": "bf16" if trainer.args.bf16 else "fp32",
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "peak_gpu_mb": _peak_mb(args.device),
    }


def run_tunery(args: argparse.Namespace, train: list[dict], tmp: Path) -> dict[str, Any]:
    import torch

    from tunery.config import TuneryConfig
    from tunery.methods import load_trained
    from tunery.train import run

    train_path = tmp / "train.jsonl"
    train_path.write_text("\n".join(DATA.read_text().splitlines()[: args.examples]) + "\n")
    config = TuneryConfig.model_validate(
        {
            "model": args.model_dir,
            "data": {"train": str(train_path)},
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "seed": args.seed,
            "output": str(tmp / "run"),
            "hyperparameters": {
                "n_epochs": 1,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "max_length": args.max_length,
                "micro_batch_tokens": args.micro_batch_tokens,
            },
        }
    )
    result = run(config)
    peak = _peak_mb(args.device)  # before the evaluation copy below is loaded
    rows = [json.loads(x) for x in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens = tt._step_tokens(train, config)  # the run's own schedule, replayed
    if len(tokens) != len(rows) or sum(tokens) != result.trained_tokens:
        raise RuntimeError(f"replayed schedule ({sum(tokens)} tokens) does not match the run's")
    seconds = [t / r["tokens_per_second"] for t, r in zip(tokens, rows, strict=True)]
    rate, tok_n, sec = common.steady_rate(tokens, seconds, args.warmup_steps)
    model, _ = load_trained(args.model_dir, str(result.model_dir), dtype=torch.float32)
    on_gpu = args.device == "cuda" and torch.cuda.is_bf16_supported()
    return {
        "model": model,
        "tokens_per_second": rate,
        "measured_tokens": tok_n,
        "measured_seconds": sec,
        "steps": len(rows),
        "train_loss_last": rows[-1]["train_loss"],
        "precision": "bf16" if on_gpu else "auto",
        "gradient_checkpointing": False,
        "peak_gpu_mb": peak,
    }


def _peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def child(args: argparse.Namespace) -> None:
    import torch

    examples = common.load_examples(args.model_dir, DATA, args.examples + args.eval_examples, args.max_length)
    train, held = examples[: args.examples], examples[args.examples :]
    torch.manual_seed(args.seed)
    runner = {"trainer": run_trainer, "trl": run_trl, "tunery": run_tunery}[args.variant]
    with tempfile.TemporaryDirectory() as t:
        out = runner(args, train, Path(t))
    model = out.pop("model").float()
    if args.device == "cuda":
        model = model.to("cuda")
    counts = common.param_counts(model)
    supervised = sum(sum(1 for x in ex["labels"][1:] if x != common.IGNORE) for ex in train)
    total = sum(len(ex["input_ids"]) for ex in train)
    out["heldout_loss"] = common.heldout_loss(model, held)
    out["params"] = counts
    out["flops_per_token"] = common.flops_per_token(counts, supervised / total)
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent side


def bench(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """Every shape and stack; `save(report)` after each shape, so a run cut short keeps what it did."""
    machine = info(args.device)
    print(json.dumps(machine, indent=2), flush=True)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    report: dict[str, Any] = {"machine": machine, "settings": _settings(args), "shapes": {}}
    with tempfile.TemporaryDirectory() as t:
        for shape in shapes:
            model_dir = build_model_dir(shape, Path(t), args.device)
            results = {}
            for variant in args.variants.split(","):
                cmd = ["child", "--variant", variant, "--model-dir", str(model_dir), *_child_flags(args)]
                r = common.run_child(Path(__file__), cmd, timeout=args.child_timeout)
                if "error" not in r:
                    peak = machine["bf16_matmul_tflops"] * 1e12
                    r["mfu"] = r["flops_per_token"] * r["tokens_per_second"] / peak
                    print(_line(shape, variant, r), flush=True)
                else:
                    print(f"{shape} {variant}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
                results[variant] = r
            report["shapes"][shape] = {"results": results, "verdict": verdict(shape, results)}
            save(report)
    return report


def verdict(shape: str, results: dict[str, Any]) -> dict[str, Any]:
    """Tunery against the tuned Trainer, on the issue's targets (None where a side failed)."""
    ours, ref = results.get("tunery", {}), results.get("trainer", {})
    if "tokens_per_second" not in ours or "tokens_per_second" not in ref:
        return {}
    out: dict[str, Any] = {"speedup": ours["tokens_per_second"] / ref["tokens_per_second"]}
    if ours.get("peak_gpu_mb") and ref.get("peak_gpu_mb"):
        out["memory_ratio"] = ours["peak_gpu_mb"] / ref["peak_gpu_mb"]
    out["loss_difference"] = abs(ours["heldout_loss"] - ref["heldout_loss"]) / ref["heldout_loss"]
    out["mfu"] = ours["mfu"]
    out["met"] = {
        "speedup": out["speedup"] >= TARGETS["speedup"],
        "memory": out["memory_ratio"] <= TARGETS["memory_ratio"] if "memory_ratio" in out else None,
        "loss": out["loss_difference"] <= TARGETS["loss_within"],
        **({"mfu": ours["mfu"] >= TARGETS["mfu_1b"]} if shape == "llama-1b" else {}),
    }
    return out


def _line(shape: str, variant: str, r: dict[str, Any]) -> str:
    mem = f"{r['peak_gpu_mb']:8.0f} MB" if r.get("peak_gpu_mb") else "      - MB"
    return (
        f"{shape:13s} {variant:8s} {r['tokens_per_second']:10.0f} tok/s {mem}  mfu {100 * r['mfu']:5.1f}%  "
        f"held-out loss {r['heldout_loss']:.4f}  ({r['wall_seconds']:.0f} s)"
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("examples", "eval_examples", "batch_size", "max_length", "learning_rate", "warmup_steps")
    return {k: getattr(args, k) for k in (*keys, "micro_batch_tokens", "seed")}


def _child_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for key, value in _settings(args).items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return [*flags, "--device", args.device]


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# GPU training bench: {m.get('gpu', m['device'])}",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}; CUDA {m['cuda']}. "
        f"Measured bf16 matmul peak: {m['bf16_matmul_tflops']:.0f} TFLOP/s.",
        f"{s['examples']} examples of datasets/chat_bench (1 epoch), {s['batch_size']} per step, max length "
        f"{s['max_length']}, LoRA r16/alpha32 all-linear, lr {s['learning_rate']} constant; first "
        f"{s['warmup_steps']} step(s) left out of tokens/s. Random-weight models built from config.",
        "",
    ]
    for shape, block in report["shapes"].items():
        lines += [
            f"## {shape}",
            "",
            "| stack | precision | grad ckpt | tok/s | vs Trainer | peak GPU MB | MFU | last train loss "
            "| held-out loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        ref = block["results"].get("trainer", {}).get("tokens_per_second")
        for name, r in block["results"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
                continue
            ratio = f"{r['tokens_per_second'] / ref:.2f}x" if ref else "-"
            peak = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
            last = f"{r['train_loss_last']:.4f}" if r.get("train_loss_last") is not None else "-"
            lines.append(
                f"| {name} | {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                f"{r['tokens_per_second']:.0f} | {ratio} | {peak} | {100 * r['mfu']:.1f}% | {last} | "
                f"{r['heldout_loss']:.4f} |"
            )
        lines += ["", f"Against the issue's targets: `{json.dumps(block['verdict'])}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["info", "bench", "child"])
    p.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few examples: a smoke run")
    p.add_argument("--shapes", default="smollm2-135m,llama-1b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--examples", type=int, default=80)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=240)
    p.add_argument("--out", default=None, help="default: docs/bench on a GPU, a temporary dir on a CPU")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.examples, args.eval_examples, args.batch_size = min(args.examples, 12), 4, 4
        args.warmup_steps = 1
    if args.command == "child":
        return child(args)
    # A CPU smoke run checks the code paths; its numbers are not results and stay out of docs/.
    default_out = common.ROOT / "docs/bench" if args.device == "cuda" else Path(tempfile.gettempdir())
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    prefix = "gpu" if args.device == "cuda" else "cpu_smoke"
    if args.command == "info":
        report = info(args.device)
        print(json.dumps(report, indent=2))
        (out / f"{prefix}_info.json").write_text(json.dumps(report, indent=2) + "\n")
        return

    def save(report: dict[str, Any]) -> None:
        (out / f"{prefix}_train.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{prefix}_train.md").write_text(markdown(report))
        print(f"wrote {out / prefix}_train.json and .md", flush=True)

    bench(args, save)


if __name__ == "__main__":
    main()
