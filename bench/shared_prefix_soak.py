"""Soak of the shared-prefix lever: is memory flat over 1,000 optimizer steps with it on and off?

    python bench/shared_prefix_soak.py                      # tiny random llama, 1,000 steps each (~2 min)
    python bench/shared_prefix_soak.py --model smollm2-135m --steps 200

Both runs train LoRA on the quickstart's sentiment rows (every row starts with the same 28-token system turn
and user header; batch 8, so each micro-batch shares it) in this process, one after the other, with
`tunery.train.run` and `Levers(shared_prefix=True/False)`. RSS per step is the loop's own `rss_mb`
(metrics.jsonl). The first 10% of steps are warm-up; a least-squares line through the rest gives the growth
per 1,000 steps, as a percentage of the run's peak (target: under 2%, as bench/soak.py). Writes
shared_prefix_soak.{json,md} under --out (docs/bench by default), with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WARMUP_FRACTION = 0.1
TARGET_PCT = 2.0


def soak(model: str, steps: int, shared: bool) -> dict[str, Any]:
    import numpy as np

    from tunery.plugins import load_config
    from tunery.train import run
    from tunery.train.events import read_jsonl
    from tunery.train.levers import Levers

    out = Path(tempfile.mkdtemp()) / "run"
    sets = {
        "model": model,
        "data.train": str(common.ROOT / "datasets/sentiment/train.jsonl"),
        "method": "lora",
        "hyperparameters.batch_size": 8,
        "hyperparameters.learning_rate": 1e-3,
        "hyperparameters.n_epochs": -(-steps * 8 // 300),  # enough epochs of the 300 rows for `steps`
        "hyperparameters.max_steps": steps,
        "hyperparameters.max_length": 256,
        "hyperparameters.precision": "fp32",
        "hyperparameters.save_steps": steps,
        "seed": 0,
        "output": str(out),
    }
    run(load_config(sets=[f"{k}={v}" for k, v in sets.items()]), levers=Levers(shared_prefix=shared))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "rss_mb" in r]
    rss = np.array([r["rss_mb"] for r in rows])
    at = np.array([r["step"] for r in rows])
    k = int(len(rows) * WARMUP_FRACTION)
    per_1000 = float(np.polyfit(at[k:], rss[k:], 1)[0]) * 1000
    return {
        "steps": int(at[-1]),
        "rss_after_warmup_mb": float(rss[k]),
        "rss_last_mb": float(rss[-1]),
        "rss_peak_mb": float(rss.max()),
        "growth_mb_per_1000_steps": round(per_1000, 1),
        "growth_pct_of_peak": round(100 * per_1000 / float(rss.max()), 2),
        "positions_per_step": round(float(np.mean([r["batch_positions"] for r in rows])), 1),
        "last_train_loss": rows[-1]["train_loss"],
    }


def markdown(report: dict[str, Any]) -> str:
    cpu = report["machine"]["cpu"]
    lines = [
        "# Shared-prefix soak",
        "",
        f"`{report['command']}`",
        "",
        f"{report['model']}, {report['steps']} optimizer steps per run, batch 8, LoRA, fp32, "
        f"{report['machine']['threads']} thread(s) on {cpu['model']} "
        f"({', '.join(cpu['flags']) or 'no AVX2'}); fp32 matmul peak "
        f"{report['peak_gflops_fp32']:.0f} GFLOPS. "
        f"Growth: a line through the steps after the first {int(WARMUP_FRACTION * 100)}%, per 1,000 steps, "
        f"as a share of the run's peak (target < {TARGET_PCT}%).",
        "",
        "| shared prefix | steps | positions per step | RSS after warm-up | last | peak "
        "| growth / 1,000 steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['steps']} | {r['positions_per_step']} | {r['rss_after_warmup_mb']:.0f} MB | "
            f"{r['rss_last_mb']:.0f} MB | {r['rss_peak_mb']:.0f} MB | {r['growth_mb_per_1000_steps']} MB "
            f"({r['growth_pct_of_peak']}%) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a model spec, or `tiny` (a random 2-layer llama)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", type=Path, default=common.ROOT / "docs" / "bench")
    args = p.parse_args()
    model = args.model
    if model == "tiny":
        from tests.helpers.tiny import make_tiny_model_dir

        model = str(make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama"))
    report: dict[str, Any] = {
        "command": "python bench/shared_prefix_soak.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "steps": args.steps,
        "machine": common.machine_info(),
        "peak_gflops_fp32": common.matmul_peak("fp32"),
        "runs": {},
    }
    for name, shared in (("on", True), ("off", False)):
        report["runs"][name] = soak(model, args.steps, shared)
        print(name, report["runs"][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_prefix_soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "shared_prefix_soak.md").write_text(markdown(report))
    print(markdown(report))
    bad = [n for n, r in report["runs"].items() if r["growth_pct_of_peak"] >= TARGET_PCT]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
