"""Chat latency and throughput of `tunery serve` under 50 concurrent requests across two adapters.

    python bench/serve_load.py                 # tiny random model, 50 requests (about a minute)
    python bench/serve_load.py --requests 200 --concurrency 50 --max-tokens 16

Workload: a real `tunery serve` process on 127.0.0.1; two rank-4 LoRA adapters (random non-zero B, so
they change outputs) on one tiny llama base, registered as fine-tuned models of the admin key. After
one warm-up request per adapter (loads the base and both adapters), N chat requests are sent from
`--concurrency` threads through the official `openai` client, alternating adapters, greedy decoding,
`max_tokens` fixed. Latency is per request, wall clock at the client; throughput is completion
tokens (from each response's `usage`) per second of the whole burst. The generation engine batches
concurrent requests, mixing the two adapters in one batch.

Writes docs/bench/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # the test helpers (tests/helpers/): tiny models, a real server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(requests: int, concurrency: int, max_tokens: int) -> dict:
    from tests.helpers.server import make_lora_adapter, register_model, running_server
    from tests.helpers.tiny import make_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = make_tiny_model_dir(tmp / "tiny", "llama")
        adapters = [make_lora_adapter(base, tmp / f"adapter{i}", seed=i) for i in range(2)]
        with running_server(tmp / "data") as server:
            names = ["ft:tiny:admin:bench-a:aaaaaaaa", "ft:tiny:admin:bench-b:bbbbbbbb"]
            for name, adapter in zip(names, adapters, strict=True):
                register_model(tmp / "data", server.api_key, name, base, adapter)
            client = server.client(timeout=600)

            def ask(i: int) -> tuple[float, int]:
                t0 = time.perf_counter()
                reply = client.chat.completions.create(
                    model=names[i % 2],
                    max_tokens=max_tokens,
                    temperature=0,
                    messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                )
                return time.perf_counter() - t0, reply.usage.completion_tokens

            t0 = time.perf_counter()
            for i in range(2):
                ask(i)
            warmup = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(ask, range(requests)))
            wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "adapters": 2,
        "model": "tiny random llama (2 layers, hidden 64)",
        "warmup_s": round(warmup, 2),
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "requests_per_s": round(requests / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p95": round(percentile(latencies, 0.95), 3),
            "mean": round(statistics.fmean(latencies), 3),
            "max": round(max(latencies), 3),
        },
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_s"]
    md = f"""# `tunery serve` under concurrent chat load

{result["requests"]} chat requests from {result["concurrency"]} client threads, alternating between
{result["adapters"]} LoRA adapters on one base ({result["model"]}), greedy, `max_tokens`
{result["max_tokens"]}, through the official `openai` client against a real server process on
127.0.0.1. Measured {result["when"]} on {result["machine"]["platform"]} (Python
{result["machine"]["python"]}); the machine has 2 cores shared with other work, so treat the numbers
as an order of magnitude. Reproduce with `python bench/serve_load.py`.

| metric | value |
|---|---|
| wall time of the burst | {result["wall_s"]} s |
| throughput | {result["requests_per_s"]} requests/s, {result["tokens_per_s"]} completion tokens/s |
| latency p50 | {lat["p50"]} s |
| latency p95 | {lat["p95"]} s |
| latency mean / max | {lat["mean"]} s / {lat["max"]} s |
| warm-up (load base + 2 adapters, 2 requests) | {result["warmup_s"]} s |
"""
    (out_dir / "serve_load.md").write_text(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    result = run(args.requests, args.concurrency, args.max_tokens)
    write(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
