"""A shared prefix prefilled once, against every prompt prefilled whole: the quickstart's evaluations.

    python bench/shared_prefix.py                       # smollm2-135m on datasets/sentiment/test.jsonl
    python bench/shared_prefix.py --repeats 2 --out docs/bench

Workload: `tunery.evaluate.evaluate` exactly as `tunery quickstart` calls it on the base model (batch 16,
greedy, the label-derived `max_new_tokens`): zero-shot, where every prompt starts with the task's system
prompt, and 3-shot, where the same three examples follow it. Each variant runs with the decode loop's
shared-prefix prefill (`generation/generate.py`, the default) and without it (`share_prefix=False`),
alternating in one process, `--repeats` times; the table keeps each variant's best time, as the machine is
shared. Accuracy and the predictions are compared: the lever must not change what the model answers.

Writes shared_prefix.{json,md} under --out (docs/bench by default), with the CPU's flags and the fp32
matmul peak measured in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT / "bench"))

import common  # noqa: E402


def evaluate_both(model: Any, tok: Any, few: Any, shots: int, repeats: int) -> dict[str, Any]:
    """Both variants of one evaluation (`few`: its few-shot examples), alternating; best seconds and the
    predictions of each."""
    from tunery.evaluate import run as run_module
    from tunery.evaluate.run import evaluate
    from tunery.resources import dataset_file
    from tunery.workflows.quickstart import TASKS

    test = dataset_file("sentiment", "test")
    original = run_module.generate_batch
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for share in (True, False):

            def batch(*args: Any, _share: bool = share, **kwargs: Any) -> Any:
                return original(*args, **kwargs, share_prefix=_share)

            run_module.generate_batch = batch  # evaluate's own call, with the lever set
            try:
                t0 = time.perf_counter()
                res = evaluate(
                    model,
                    tok,
                    test,
                    labels=TASKS["sentiment"],
                    batch_size=16,
                    few_shot=few,
                    progress=False,
                    compute_loss=False,
                    n_shown=0,
                )
                seconds = time.perf_counter() - t0
            finally:
                run_module.generate_batch = original
            key = "shared" if share else "whole"
            best = out.get(key, {}).get("seconds", float("inf"))
            out[key] = {
                "seconds": round(min(best, seconds), 2),
                "accuracy": res["accuracy"],
                "predictions": res["predictions"],
            }
            print(f"{shots}-shot {key}: {seconds:.1f} s, accuracy {res['accuracy']:.3f}", flush=True)
    out["same_predictions"] = out["shared"]["predictions"] == out["whole"]["predictions"]
    out["speedup"] = round(out["whole"]["seconds"] / out["shared"]["seconds"], 2)
    return out


def markdown(report: dict[str, Any]) -> str:
    cpu = report["machine"]["cpu"]
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['model']}, {report['n_test']} prompts of datasets/sentiment/test.jsonl, batch 16, greedy; "
        f"{report['machine']['threads']} thread(s) on {cpu['model']} "
        f"({', '.join(cpu['flags']) or 'no AVX'}), "
        f"fp32 matmul peak {report['peak_gflops_fp32']:.0f} GFLOPS. Best of {report['repeats']}.",
        "",
        "| evaluation | shared prefix tokens | whole prompts s | shared prefix s | speedup | same replies |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['shared_prefix_tokens']} | {r['whole']['seconds']} | {r['shared']['seconds']} | "
            f"{r['speedup']}x | {'yes' if r['same_predictions'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = p.parse_args()

    import torch

    from tunery.data import encode_prompt
    from tunery.evaluate.run import build_few_shot, load_conversations, split_example, with_few_shot
    from tunery.generation.generate import shared_prefix_length
    from tunery.methods import load_trained
    from tunery.resources import dataset_file

    report: dict[str, Any] = {
        "command": "python bench/shared_prefix.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "repeats": args.repeats,
        "machine": common.machine_info(),
        "peak_gflops_fp32": common.matmul_peak("fp32"),
        "results": {},
    }
    model, tok = load_trained(args.model, None, dtype=torch.float32)
    model.eval()
    convs = load_conversations(dataset_file("sentiment", "test"))
    report["n_test"] = len(convs)
    for shots in (0, 3):
        few = (
            build_few_shot(load_conversations(dataset_file("sentiment", "train")), shots, 42)
            if shots
            else None
        )
        prompts = [encode_prompt(with_few_shot(split_example(c)[0], few), tok, None) for c in convs]
        row = evaluate_both(model, tok, few, shots, args.repeats)
        row["shared_prefix_tokens"] = shared_prefix_length(prompts)
        row["mean_prompt_tokens"] = round(sum(map(len, prompts)) / len(prompts), 1)
        report["results"]["zero-shot" if not shots else f"{shots}-shot"] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in report["results"].values():
        for key in ("shared", "whole"):
            row[key].pop("predictions")
    (out / "shared_prefix.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "shared_prefix.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
