"""Training throughput: Tunery against the stacks LLaMA-Factory and Axolotl use, side by side (issue 7).

    python bench/train_throughput.py --model tiny --examples 16       # quick check (a minute)
    python bench/train_throughput.py                                  # smollm2-135m, 64 examples

Every variant runs in its own child process, one after another, on the same data
(datasets/chat_bench/train.jsonl, tokenized once with the model's chat template, loss on assistant
replies only), the same LoRA (r=16, alpha=32, dropout 0, all linear layers), the same examples per
optimizer step (8), maximum length, learning rate, constant schedule without warm-up, AdamW and
gradient clipping at 1.0, for `--epochs` epochs (default 1) over the first `--examples` rows of
`--data` (default datasets/chat_bench/train.jsonl):

- `trainer-defaults` / `trainer-tuned`: `transformers.Trainer` + peft, dynamic padding, batch 8.
  Defaults are fp32; tuned adds bf16 autocast where Tunery's `auto` would take it (native bf16
  that a matmul probe measures faster). Neither uses gradient checkpointing.
- `trl-defaults` / `trl-tuned`: TRL `SFTTrainer` with packing (its default best-fit packing into
  `max_length` rows, padding-free). Defaults keep TRL's gradient checkpointing; tuned turns it off.
  Both use bf16 (TRL's default) where Tunery's `auto` would, fp32 otherwise. Packed rows per step
  are chosen so a step holds about as many tokens as 8 examples (packing cannot hold the example
  count itself fixed).
- `tunery`: `tunery.train.run` with its defaults (packed rows with per-example SDPA, LM head only at
  supervised positions, `auto` precision (bf16 autocast only where measured faster), fused AdamW,
  length-sorted micro-batches).
- Levers, each Tunery with one thing undone: `tunery-mask4d` (one SDPA call with a dense 4D block
  mask instead of per-example attention), `tunery-full-head` (LM head at every position),
  `tunery-padded` (padded micro-batches instead of packing), `tunery-fp32` (no bf16 autocast),
  `tunery-glibc` (the system allocator instead of jemalloc), `tunery-unfused` (peft's own LoRA
  forward instead of the fused LoRA layer), `tunery-unshared` (the prefix a packed micro-batch's
  rows have in common, such as a system prompt, computed once per row instead of once).

Per variant: non-padding tokens/s over the steps after `--warmup-steps`, peak RSS of the child, the
stack's own last training loss, a held-out loss measured identically for all (fp32, one example at
a time, on rows after the training ones), and MFU against bf16/fp32 `torch.matmul` peaks measured
in this run with the same threads (model FLOPs: see `common.flops_per_token`).
Writes docs/bench/train_throughput.{json,md} (`--stem` names another pair).

Real length (issue 20): a lever is judged on at least 200 optimizer steps, for example

    python bench/train_throughput.py --data datasets/routing/train.jsonl --examples 200 --batch-size 1 \
        --stem train_throughput_b1   # 200 steps at batch 1
    python bench/train_throughput.py --data datasets/routing/train.jsonl --examples 272 --epochs 6 \
        --stem train_throughput_b8   # 204 steps at batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = common.ROOT / "datasets/chat_bench/train.jsonl"
BASELINES = ["trainer-defaults", "trainer-tuned", "trl-defaults", "trl-tuned"]
LEVERS = [
    "tunery-mask4d",
    "tunery-full-head",
    "tunery-padded",
    "tunery-fp32",
    "tunery-glibc",
    "tunery-unfused",
    "tunery-unshared",
]
ALL = [*BASELINES, "tunery", *LEVERS]


# ---------------------------------------------------------------- child side: one variant


def model_dir(spec: str, tmp: Path) -> str:
    if spec == "tiny":
        from tests.helpers.tiny import make_tiny_model_dir

        return str(make_tiny_model_dir(tmp / "tiny", "llama"))
    from tunery.models import resolve

    return str(resolve(spec).path)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


class StepClock:
    """A Trainer callback: wall time of each optimizer step, from the end of the previous one (so
    data loading and collation count, as they do for Tunery's per-step rate)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.seconds: list[float] = []
        self.losses: list[float] = []

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock._last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                clock.seconds.append(now - clock._last)
                clock._last = now

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        self.callback = _Cb()


def counting(collator, tokens: list[int]):
    """Wrap a collator to record each batch's non-padding tokens (one batch = one step here)."""

    def collate(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    return collate


def pad_collator(pad_id: int):
    import torch

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), common.IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for k, f in enumerate(features):
            n = len(f["input_ids"])
            ids[k, :n] = torch.tensor(f["input_ids"])
            labels[k, :n] = torch.tensor(f["labels"])
            mask[k, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def hf_common_args(args: argparse.Namespace, tmp: Path) -> dict:
    """The training arguments both Hugging Face stacks share (see the module docstring)."""
    return dict(
        output_dir=str(tmp / "out"),
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )


def run_hf(variant: str, path: str, train: list[dict], args: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasets import Dataset
    from tunery.train.precision import auto_bf16_on_cpu

    tok = AutoTokenizer.from_pretrained(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list(train)
    clock = StepClock()
    tokens: list[int] = []
    common_args = hf_common_args(args, tmp)
    if variant.startswith("trainer"):
        from transformers import Trainer, TrainingArguments

        targs = TrainingArguments(
            per_device_train_batch_size=args.batch_size,
            bf16=variant == "trainer-tuned" and auto_bf16_on_cpu(),
            gradient_checkpointing=False,
            remove_unused_columns=False,
            **common_args,
        )
        model = get_peft_model(model, lora_config())
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=ds,
            data_collator=counting(pad_collator(pad_id), tokens),
            callbacks=[clock.callback],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        mean_len = sum(len(x["input_ids"]) for x in train) / len(train)
        rows = max(1, round(args.batch_size * mean_len / args.max_length))
        # TRL defaults to bf16; without AVX512-BF16 that is a scalar fallback hundreds of times slower,
        # and with it bf16 can still lose to fp32 (see the matmul peaks), so both TRL variants take
        # bf16 only where Tunery's `auto` would: where a matmul probe measures it faster.
        extra = {"bf16": auto_bf16_on_cpu()}
        if variant == "trl-tuned":
            extra["gradient_checkpointing"] = False
        sargs = SFTConfig(
            packing=True, max_length=args.max_length, per_device_train_batch_size=rows, **extra, **common_args
        )
        trainer = SFTTrainer(
            model=model,
            args=sargs,
            train_dataset=ds,
            processing_class=tok,
            peft_config=lora_config(),
            callbacks=[clock.callback],
        )
        trainer.data_collator = counting(trainer.data_collator, tokens)
    trainer.train()
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
    }


def run_tunery(
    variant: str, path: str, train_path: Path, train: list[dict], args: argparse.Namespace, tmp: Path
) -> dict:
    from tunery.config import TuneryConfig
    from tunery.methods import load_trained
    from tunery.train.levers import Levers
    from tunery.train.precision import autocast_dtype

    levers = Levers(
        attention="mask" if variant == "tunery-mask4d" else "auto",  # auto: varlen on a GPU
        supervised_head_only=variant != "tunery-full-head",
        fused_lora=variant != "tunery-unfused",
        shared_prefix=variant != "tunery-unshared",
    )
    precision = "fp32" if variant == "tunery-fp32" else "auto"
    config = TuneryConfig.model_validate(
        {
            "model": path,
            "data": {"train": str(train_path)},
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "objective": "sft",
            "seed": args.seed,
            "output": str(tmp / "run"),
            "hyperparameters": {
                "n_epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "max_length": args.max_length,
                "packing": variant != "tunery-padded",
                "precision": precision,
                **({"micro_batch_tokens": args.micro_batch_tokens} if args.micro_batch_tokens else {}),
            },
        }
    )
    from tunery.train import run

    result = run(config, levers=levers)
    rows = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    # logging_steps=1, so each row's tokens_per_second covers exactly one step. The step's tokens come
    # from Tunery's own schedule (a pure function of lengths, seed and settings), replayed here.
    tokens = _step_tokens(train, config, args.epochs)
    if len(tokens) != len(rows) or sum(tokens) != result.trained_tokens:
        raise RuntimeError(f"replayed schedule ({sum(tokens)} tokens) does not match the run's")
    seconds = [t / r["tokens_per_second"] for t, r in zip(tokens, rows, strict=True)]
    rate, tok_n, sec = common.steady_rate(tokens, seconds, args.warmup_steps)
    model, _ = load_trained(path, str(result.model_dir))
    dtype = autocast_dtype(precision, __import__("torch").device("cpu"))
    return {
        "model": model,
        "tokens_per_second": rate,
        "measured_tokens": tok_n,
        "measured_seconds": sec,
        "steps": len(rows),
        "train_loss_last": rows[-1]["train_loss"],
        "precision": "bf16" if dtype is not None else "fp32",
        "gradient_checkpointing": False,
    }


def _step_tokens(train: list[dict], config, epochs: int = 1) -> list[int]:
    from tunery.train.batching import schedule

    hp = config.hyperparameters
    lengths = [len(x["input_ids"]) for x in train]
    steps = schedule(
        lengths,
        batch_size=hp.batch_size,
        n_epochs=epochs,
        seed=config.seed,
        token_budget=max(hp.micro_batch_tokens, hp.max_length),
    )
    return [sum(lengths[i] for mb in st.micro_batches for i in mb) for st in steps]


def child(args: argparse.Namespace) -> None:
    import torch

    from tunery.train.memory import active_allocator

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        path = model_dir(args.model, tmp)
        data = Path(args.data)
        examples = common.load_examples(path, data, args.examples + args.eval_examples, args.max_length)
        train, held = examples[: args.examples], examples[args.examples :] or examples[: args.eval_examples]
        torch.manual_seed(args.seed)
        if args.child.startswith("tunery"):
            train_path = tmp / "train.jsonl"
            lines = data.read_text().splitlines()[: args.examples]
            train_path.write_text("\n".join(lines) + "\n")
            out = run_tunery(args.child, path, train_path, train, args, tmp)
        else:
            out = run_hf(args.child, path, train, args, tmp)
        model = out.pop("model")
        counts = common.param_counts(model)
        sup = sum(sum(1 for x in ex["labels"][1:] if x != common.IGNORE) for ex in train)
        total = sum(len(ex["input_ids"]) for ex in train)
        out["heldout_loss"] = common.heldout_loss(model, held)
        out["params"] = counts
        out["supervised_fraction"] = sup / total
        out["flops_per_token"] = common.flops_per_token(counts, sup / total)
        out["peak_rss_mb"] = common.peak_rss_mb()
        out["threads"] = torch.get_num_threads()
        out["allocator"] = active_allocator()
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent side: all variants


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Training throughput: {report['model']}",
        "",
        f"`{report['command']}`",
        "",
        f"{report['examples']} examples of {report['data']} ({report['epochs']} epoch(s), "
        f"{_steps(report)} optimizer steps), {report['batch_size']} examples per step, max length "
        f"{report['max_length']}, LoRA r16/alpha32 all-linear, lr {report['learning_rate']} constant; "
        f"first {report['warmup_steps']} step(s) excluded from tokens/s. {m['threads']} threads"
        + (f" on {m['cpu']['model']} ({', '.join(m['cpu']['flags']) or 'no AVX2'}), " if "cpu" in m else ", ")
        + f"CPU bf16: {m['cpu_bf16']}, `auto` takes {'bf16' if m.get('auto_bf16') else 'fp32'}. "
        f"Load average before the run: {m['load_average']}, after: "
        f"{report['load_average_after']}. Matmul peaks (this run): fp32 {report['peak_gflops']['fp32']:.0f} "
        f"GFLOPS, bf16 {report['peak_gflops']['bf16']:.0f} GFLOPS.",
        "",
        "| variant | precision | grad ckpt | allocator | tok/s | vs trainer-tuned | peak RSS MB "
        "| last train loss | held-out loss | MFU (own dtype peak) | MFU (bf16 peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = report["results"].get("trainer-tuned", {}).get("tokens_per_second")
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_second'] / ref:.2f}x" if ref else "-"
        last = f"{r['train_loss_last']:.4f}" if r["train_loss_last"] is not None else "-"
        lines.append(
            f"| {name} | {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{r.get('allocator', '-')} | {r['tokens_per_second']:.1f} | {ratio} | "
            f"{r['peak_rss_mb']:.0f} | {last} | "
            f"{r['heldout_loss']:.4f} | {100 * r['mfu']:.1f}% | {100 * r['mfu_bf16']:.1f}% |"
        )
    lines += [
        "",
        "Model FLOPs per token = 4·N_body + 4·N_head·(supervised share): forward 2·N plus backward 2·N "
        "through the frozen weights (no frozen-weight gradients), with the LM head counted only where the "
        "loss needs logits; attention scores and the LoRA matrices are not counted. "
        f"N_body = {report['params']['body']:,}, N_head = {report['params']['head']:,}, supervised share "
        f"{report['supervised_fraction']:.2f}. MFU = model FLOPs/s over the matmul peak.",
    ]
    return "\n".join(lines) + "\n"


def _shown(path: str) -> str:
    """`path` relative to the repository where it is inside it, so reports name no local folders."""
    p = Path(path).resolve()
    return str(p.relative_to(common.ROOT)) if p.is_relative_to(common.ROOT) else p.name


def _steps(report: dict) -> str:
    """The optimizer steps each variant took, as one figure where they agree."""
    steps = sorted({r["steps"] for r in report["results"].values() if "error" not in r})
    return " / ".join(map(str, steps)) or "no"


def child_env(variant: str) -> dict[str, str]:
    """Tunery runs on jemalloc where installed, as `tunery train` does (train/memory.py); the baselines
    and the `tunery-glibc` lever run on the system allocator, as they would by default."""
    from tunery.train.memory import ALLOCATOR_ENV, allocator_env

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if variant.startswith("tunery") and variant != "tunery-glibc":
        return allocator_env(env)
    return {**env, ALLOCATOR_ENV: "system"}


def parent(args: argparse.Namespace) -> None:
    variants = ALL if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in ALL]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {ALL}")
    machine = common.machine_info()
    peaks = {d: common.matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmul peaks GFLOPS: {peaks}; load {machine['load_average']}", flush=True)
    shared = [
        "--model", args.model, "--examples", str(args.examples), "--eval-examples", str(args.eval_examples),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--learning-rate", str(args.learning_rate), "--warmup-steps", str(args.warmup_steps),
        "--seed", str(args.seed), "--data", args.data, "--epochs", str(args.epochs),
        *(["--micro-batch-tokens", str(args.micro_batch_tokens)] if args.micro_batch_tokens else []),
    ]  # fmt: skip
    results: dict[str, Any] = {}
    for v in variants:
        r = common.run_child(Path(__file__), ["--child", v, *shared], env=child_env(v))
        if "error" not in r:
            flops = r["flops_per_token"] * r["tokens_per_second"] / 1e9
            r["model_gflops"] = flops
            r["mfu"] = flops / peaks[r["precision"]]
            r["mfu_bf16"] = flops / peaks["bf16"]
            print(
                f"{v:18s} {r['tokens_per_second']:8.1f} tok/s  rss {r['peak_rss_mb']:6.0f} MB  "
                f"loss {r['heldout_loss']:.4f}  mfu {100 * r['mfu']:.1f}%  ({r['wall_seconds']:.0f} s)",
                flush=True,
            )
        else:
            print(f"{v}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
        results[v] = r
    ok = [r for r in results.values() if "error" not in r]
    report = {
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "data": _shown(args.data),
        "examples": args.examples,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "machine": machine,
        "load_average_after": [round(x, 2) for x in __import__("os").getloadavg()],
        "peak_gflops": peaks,
        "params": ok[0]["params"] if ok else {"body": 0, "head": 0},
        "supervised_fraction": ok[0]["supervised_fraction"] if ok else 0.0,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("train_throughput" if args.model != "tiny" else "train_throughput_tiny")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a model spec, or `tiny` (random 2-layer llama)")
    p.add_argument("--data", default=str(DATA), help="chat JSONL to train on (default datasets/chat_bench)")
    p.add_argument("--examples", type=int, default=64, help="training rows (the file's first N)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over those rows (every variant)")
    p.add_argument("--stem", help="output file name without extension (default train_throughput)")
    p.add_argument("--eval-examples", type=int, default=16, help="held-out rows for the common loss")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of tokens/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="Tunery token budget per forward (default: its own)",
    )
    p.add_argument("--variants", default="all", help=f"comma-separated subset of {ALL}")
    p.add_argument("--out", default=str(common.ROOT / "docs/bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
