"""Serving engines side by side: a real `tunery serve` per engine, driven by the official `openai` SDK.

    python bench/serve_engines.py                         # smollm2-135m, about 10 minutes
    python bench/serve_engines.py --engines torch llamacpp:q8_0 --max-tokens 32

Each engine (`torch`, `llamacpp:f32`, `llamacpp:q8_0`, ...) gets its own server process, one after the
other on a quiet machine, with the same workload: 8 chat prompts, greedy, `max_tokens` fixed, streamed
(`stream_options.include_usage`), against the base model and against a LoRA adapter registered as a
fine-tuned model (rank 16 on every linear layer, random B, so it really changes the forward). Phases:
one client sending the 8 prompts one after another, then 8 clients sending 2 each at once. For each
phase: completion tokens (from `usage`) per second of the phase's wall time, and per request the
latency to the first content token and to the last token, p50 and p95. A warm-up request per model
before the timed phases loads the model (and, for llama.cpp, writes its GGUF forms once; that time is
reported as `first_request_s`). Peak RSS is the server process's own high-water mark (VmHWM).

Writes docs/bench/serve_engines.{json,md}, with the CPU's flags and matmul peaks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import ROOT, machine_info, matmul_peak

from tunery.cpu import cpu_identity

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a neural network is.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23?",
    "Summarize the plot of Hamlet.",
    "How do I boil an egg?",
    "Translate 'good morning' to Spanish.",
]
ADAPTER_MODEL = "ft:smollm2-135m:admin:bench:aaaaaaaa"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "f16c")
    return sorted(set(cpu_identity()[1].split()) & set(wanted))


def peak_rss_mb(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def stream_one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    last = time.perf_counter() - t0
    return {"ttft": first if first is not None else last, "last": last, "tokens": tokens}


def phase(client: Any, model: str, clients: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(clients * rounds)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: stream_one(client, model, p, max_tokens), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in results]
        return {"p50": round(percentile(values, 0.5), 3), "p95": round(percentile(values, 0.95), 3)}

    return {
        "clients": clients,
        "requests": len(jobs),
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "first_token_s": stats("ttft"),
        "last_token_s": stats("last"),
        "mean_tokens": round(statistics.fmean(r["tokens"] for r in results), 1),
    }


def run_engine(engine: str, tmp: Path, adapter: Path, base_dir: Path, max_tokens: int) -> dict[str, Any]:
    from tests.helpers.server import register_model, running_server

    kind, _, gguf = engine.partition(":")
    args = ["--engine", kind] + (["--gguf-type", gguf] if gguf else [])
    data = tmp / f"data-{engine.replace(':', '-')}"
    with running_server(data, "bench-admin-key", *args, env={"TUNERY_CACHE": str(tmp / "cache")}) as server:
        register_model(data, server.api_key, ADAPTER_MODEL, "smollm2-135m", _copy(adapter, tmp))
        client = server.client(timeout=900)
        out: dict[str, Any] = {"engine": engine, "models": {}}
        for label, model in (("base", "smollm2-135m"), ("lora", ADAPTER_MODEL)):
            t0 = time.perf_counter()
            stream_one(client, model, PROMPTS[0], 4)
            first = round(time.perf_counter() - t0, 2)
            engines = {m.id: m.model_extra.get("tunery", {}).get("engine") for m in client.models.list()}
            out["models"][label] = {
                "first_request_s": first,
                "served_by": engines.get(model),
                "one_client": phase(client, model, 1, len(PROMPTS), max_tokens),
                "eight_clients": phase(client, model, 8, 2, max_tokens),
            }
            print(json.dumps({engine: {label: out["models"][label]}}), flush=True)
        out["peak_rss_mb"] = peak_rss_mb(server.proc.pid)
    return out


def _copy(adapter: Path, tmp: Path) -> Path:
    import shutil

    dest = tmp / f"adapter-{time.monotonic_ns()}"
    shutil.copytree(adapter, dest)
    return dest


def markdown(report: dict[str, Any]) -> str:
    base = {r["engine"]: r for r in report["results"]}.get("torch")
    lines = [
        "# Serving engines: `tunery serve` per engine, official `openai` SDK",
        "",
        f"smollm2-135m, {len(PROMPTS)} chat prompts, greedy, max_tokens {report['max_tokens']}, streamed. "
        "One client: 8 requests one after another; 8 clients: 16 requests, 2 each, at once. Latencies "
        "are per request at the client. Reproduce: `python bench/serve_engines.py`.",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, flags {', '.join(report['cpu_flags'])}; matmul "
        f"peaks fp32 {report['matmul_gflops']['fp32']:.0f} GFLOPS, bf16 {report['matmul_gflops']['bf16']:.0f}"
        f" GFLOPS; {report['when']}.",
        "",
        "| engine | model | served by | 1 client tok/s | 8 clients tok/s | first token p50 / p95 (8 clients) "
        "| last token p50 / p95 (8 clients) | first request | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for label, m in r["models"].items():
            one, eight = m["one_client"], m["eight_clients"]
            ratio = ""
            if base and r is not base:
                ref = base["models"][label]
                ratio = (
                    f" ({one['tokens_per_s'] / ref['one_client']['tokens_per_s']:.1f}x / "
                    f"{eight['tokens_per_s'] / ref['eight_clients']['tokens_per_s']:.1f}x)"
                )
            ttft, last = eight["first_token_s"], eight["last_token_s"]
            lines.append(
                f"| {r['engine']}{ratio} | {label} | {m['served_by']} | {one['tokens_per_s']} | "
                f"{eight['tokens_per_s']} | {ttft['p50']} / {ttft['p95']} s"
                f" | {last['p50']} / {last['p95']} s | "
                f"{m['first_request_s']} s | {r['peak_rss_mb']} MB |"
            )
    lines += [
        "",
        "Ratios in the engine column are tokens/s against `torch` in the same run (1 client / 8 clients).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["torch", "llamacpp:f32", "llamacpp:q8_0"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    from tests.helpers.server import make_lora_adapter
    from tunery.models.resolve import resolve

    report: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "machine": machine_info(),
        "cpu_flags": cpu_flags(),
        "matmul_gflops": {d: round(matmul_peak(d), 1) for d in ("fp32", "bf16")},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [],
    }
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base_dir = resolve("smollm2-135m").path
        adapter = make_lora_adapter(base_dir, tmp / "adapter", seed=0, r=16, alpha=16)
        for engine in args.engines:
            report["results"].append(run_engine(engine, tmp, adapter, base_dir, args.max_tokens))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_engines.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serve_engines.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
