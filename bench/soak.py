"""Soak benchmark: is memory bounded over runs of the length users run (issue 20)?

    python bench/soak.py                                          # smollm2-135m: the real soak
    python bench/soak.py --model tiny --steps-b1 60 --steps-b8 10 --requests 40 --out /tmp/soak  # smoke
    python bench/soak.py --skip-serve        # training only; the serving part of OUT/soak.json is kept

Data: about 1,000 chat examples built deterministically from the bundled datasets (chat_bench,
sentiment, routing, qa, extraction, rewrite): most are one conversation, the rest join two to eight
conversations into one multi-turn example, so lengths run from about 30 to about 1,000 tokens and
almost every step has a new shape, which is what made jemalloc without decay grow (issue 20).

Training: `python -m tunery.cli train` in a child process, as a user runs it, so the allocator
re-exec applies: `--steps-b1` optimizer steps at batch 1, then `--steps-b8` at batch 8. RSS per
step is the loop's own `rss_mb` in metrics.jsonl; the RSS of the whole process tree is also sampled
from outside every `--sample-seconds`, to catch what the loop does not see (loading, saving).

Serving: one `tunery serve` on 127.0.0.1 (a free port, an API key, its own data dir) runs three
fine-tuning jobs back to back through the official `openai` SDK, then answers `--requests` chat
requests alternating over two of the resulting `ft:` models from `--concurrency` client threads.
The RSS of the server and of every child (the job workers) is sampled throughout (rss_sampler.py).

Analysis: the first 10% of steps (or requests) are warm-up. A least-squares line through the rest
gives the growth per 1,000 steps (training) or over all the requests (serving), as a percentage of
the part's peak RSS. Target: under 2%. Writes OUT/soak.json, OUT/soak.md and OUT/soak.png (RSS
against steps for each training run, RSS against requests for the server). Exits 1 when a part
failed or missed the target.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from rss_sampler import Sampler, psutil, tree_rss  # noqa: E402
from time_to_quality import cpu_info  # noqa: E402  (one reader of the CPU flags)

from tests.helpers.server import running_server  # noqa: E402
from tests.helpers.tiny import make_tiny_model_dir, write_jsonl  # noqa: E402

ROOT = common.ROOT
SOURCES = ("chat_bench", "sentiment", "routing", "qa", "extraction", "rewrite")
TARGET_PCT = 2.0  # issue 20: growth after warm-up under 2% of peak
WARMUP_FRACTION = 0.1
STEPS_PER = 1000  # training growth is reported per 1,000 optimizer steps
MAX_CHARS = 4000  # ~1,000 tokens at ~4 characters a token: the longest joined example
TINY_MAX_LENGTH = 256  # the smoke model's 512 positions; also keeps the smoke run short
# Chat prompts: a user turn cut to this many characters. The tiny model's byte-level tokenizer makes
# ~0.7 tokens of a character and its context is 512, which the server enforces with a 400.
PROMPT_CHARS = {"real": 2000, "tiny": 500}
TERMINAL = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------- data


def load_conversations(root: Path = ROOT / "datasets") -> list[dict[str, Any]]:
    """Every training row of the bundled chat sets present: its system prompt and its other turns."""
    out = []
    for name in SOURCES:
        path = root / name / "train.jsonl"
        if not path.exists():
            continue  # a checkout without one of the sets still soaks on the others
        for line in path.read_text().splitlines():
            messages = json.loads(line)["messages"]
            system = next((m["content"] for m in messages if m["role"] == "system"), None)
            turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
            out.append({"source": name, "system": system, "turns": turns})
    return out


def build_soak_set(n: int = 1000, seed: int = 0, root: Path = ROOT / "datasets") -> list[dict[str, Any]]:
    """`n` chat examples of varied length, the same for the same seed.

    Six in ten are one conversation, the rest join 2 to 8 (stopping before MAX_CHARS), and three in
    ten single ones drop their system prompt: from a bare sentiment review (~30 tokens) to several
    chat_bench answers in a row (~1,000). Joined examples keep the first conversation's system prompt.
    """
    pool = load_conversations(root)
    if not pool:
        raise SystemExit(f"no bundled chat data under {root}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choices([1, 2, 3, 4, 6, 8], weights=[60, 15, 10, 7, 5, 3])[0]
        picked = rng.sample(pool, k)
        keep_system = picked[0]["system"] is not None and (k > 1 or rng.random() < 0.7)
        messages = [{"role": "system", "content": picked[0]["system"]}] if keep_system else []
        chars = sum(len(m["content"]) for m in messages)
        for conv in picked:
            size = sum(len(m["content"]) for m in conv["turns"])
            if len(messages) > 1 and chars + size > MAX_CHARS:
                break
            messages += conv["turns"]
            chars += size
        rows.append({"messages": messages})
    return rows


def length_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    chars = sorted(sum(len(m["content"]) for m in r["messages"]) for r in rows)
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]

    def q(p: float) -> int:
        return chars[min(len(chars) - 1, int(p * len(chars)))]

    return {
        "examples": len(rows),
        "chars": {"min": chars[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": chars[-1]},
        "multi_turn": sum(t > 1 for t in turns),
        "approx_tokens": {"min": chars[0] // 4, "max": chars[-1] // 4},
    }


# ---------------------------------------------------------------- analysis (pure)


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs; None with under two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    try:
        return statistics.linear_regression(xs, ys).slope
    except statistics.StatisticsError:  # fewer than two points, or every x the same
        return None


def meets_target(growth_pct: float | None, target: float = TARGET_PCT) -> bool:
    """Growth strictly under the target; no figure (too few samples) is not a pass."""
    return growth_pct is not None and growth_pct < target


def growth(
    xs: list[float],
    ys: list[float],
    per: float,
    warmup_fraction: float = WARMUP_FRACTION,
    target: float = TARGET_PCT,
) -> dict[str, Any]:
    """RSS growth after warm-up, as MB and as % of the peak, over `per` units of x.

    xs are steps (or completed requests), ys RSS in MB. Points with x under `warmup_fraction` of the
    last x are warm-up (the model loading, the allocator filling its first arenas) and are left out
    of the fit, but not of the peak: the peak is the most the run ever held.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    empty = {"points": 0, "growth_mb": None, "growth_pct": None, "target_met": False}
    if not xs:
        return empty
    start = warmup_fraction * max(xs)
    kept = sorted((x, y) for x, y in zip(xs, ys, strict=True) if x >= start)
    slope = fit_slope([x for x, _ in kept], [y for _, y in kept])
    peak = max(ys)
    growth_mb = None if slope is None else slope * per
    pct = None if growth_mb is None or peak <= 0 else 100 * growth_mb / peak

    def at(x_target: float) -> float:
        return min(kept, key=lambda p: abs(p[0] - x_target))[1]

    return {
        "points": len(kept),
        "warmup_end": start,
        "per": per,
        "slope_mb": slope,
        "growth_mb": growth_mb,
        "growth_pct": pct,
        "peak_mb": peak,
        "rss_warmup_end_mb": kept[0][1],
        "rss_middle_mb": at((start + kept[-1][0]) / 2),
        "rss_end_mb": kept[-1][1],
        "target_met": meets_target(pct, target),
    }


# ---------------------------------------------------------------- training part


class MetricsTail:
    """The last step logged in a growing metrics.jsonl (complete lines only), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.step = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return self.step
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            self.step = max(self.step, int(json.loads(line).get("step", 0)))
        return self.step


def train_command(
    model: str, data: Path, run_dir: Path, batch: int, steps: int, n_examples: int, tiny: bool = False
) -> list[str]:
    """`tunery train` as a user types it, with enough epochs that max_steps is what stops it."""
    epochs = math.ceil(steps * batch / n_examples) + 1
    sets = {"batch_size": batch, "max_steps": steps, "n_epochs": epochs}
    if tiny:
        sets["max_length"] = TINY_MAX_LENGTH
    cmd = [sys.executable, "-m", "tunery.cli", "train", "--model", model, "--data", str(data)]
    cmd += ["--output", str(run_dir)]
    for key, value in sets.items():
        cmd += ["--set", f"hyperparameters.{key}={value}"]
    return cmd


def train_part(model: str, data: Path, batch: int, steps: int, tmp: Path, args: argparse.Namespace) -> dict:
    run_dir = tmp / f"train-b{batch}"
    n_examples = sum(1 for _ in data.open())
    cmd = train_command(model, data, run_dir, batch, steps, n_examples, tiny=args.model == "tiny")
    log_path = tmp / f"train-b{batch}.log"
    print(f"training: batch {batch}, {steps} steps", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with Sampler(proc.pid, MetricsTail(run_dir / "metrics.jsonl"), args.sample_seconds) as sampler:
            proc.wait()
    wall = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        return {"batch": batch, "steps": steps, "error": f"exit code {proc.returncode}", "log_tail": tail}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "rss_mb" in r]
    step_x, step_rss = [r["step"] for r in rows], [r["rss_mb"] for r in rows]
    samples = sampler.samples
    return {
        "batch": batch,
        "steps": steps,
        "steps_done": step_x[-1] if step_x else 0,
        "wall_s": round(wall, 1),
        "command": " ".join(cmd[1:]),
        "per_step": growth(step_x, step_rss, STEPS_PER, args.warmup_fraction),
        "sampled": growth(
            [s["x"] for s in samples], [s["total_mb"] for s in samples], STEPS_PER, args.warmup_fraction
        ),
        "series": {"step": step_x, "rss_mb": step_rss},
        "samples": samples,
        "processes": sampler.processes,
    }


# ---------------------------------------------------------------- serving part


def wait_job(client: Any, job_id: str, timeout: float) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        time.sleep(2)
    raise RuntimeError(f"fine-tuning job {job_id} did not finish in {timeout:.0f} s")


def run_jobs(server: Any, client: Any, model: str, rows: list[dict], tmp: Path, args: argparse.Namespace):
    """Three fine-tuning jobs one after another; their models and the server's RSS after each."""
    path = write_jsonl(tmp / "jobs.jsonl", rows[: args.job_examples])
    with open(path, "rb") as fh:
        upload = client.files.create(file=fh, purpose="fine-tune")
    extra = {"max_steps": args.job_steps}
    if args.model == "tiny":
        extra["max_length"] = TINY_MAX_LENGTH
    jobs = []
    for i in range(3):
        t0 = time.perf_counter()
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=upload.id,
            suffix=f"soak{i + 1}",
            seed=i,
            hyperparameters={"n_epochs": 1},
            extra_body={"tunery": {"hyperparameters": extra}},
        )
        job = wait_job(client, job.id, args.job_timeout)
        if job.status != "succeeded":
            raise RuntimeError(f"job {i + 1} {job.status}: {job.error}\n{server.log()[-3000:]}")
        after = tree_rss(server.proc.pid)
        jobs.append(
            {
                "model": job.fine_tuned_model,
                "wall_s": round(time.perf_counter() - t0, 1),
                "trained_tokens": job.trained_tokens,
                "server_rss_after_mb": round(after.get(server.proc.pid, 0.0), 1),
            }
        )
        print(f"  job {i + 1}: {job.fine_tuned_model} in {jobs[-1]['wall_s']} s", flush=True)
    return jobs


class Answered:
    """Requests answered so far, counted from several client threads."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.n += 1

    def __call__(self) -> int:
        return self.n


def chat_burst(client: Any, names: list[str], rows: list[dict], answered: Answered, args) -> dict[str, Any]:
    """`args.requests` chat requests alternating over `names`, prompts of varied length."""
    limit = PROMPT_CHARS["tiny" if args.model == "tiny" else "real"]
    prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user")[:limit] for r in rows]

    def ask(i: int) -> int:
        reply = client.chat.completions.create(
            model=names[i % len(names)],
            max_tokens=args.max_tokens,
            temperature=0,
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
        )
        answered.add()
        return reply.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(ask, range(args.requests)))
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 1),
        "completion_tokens": tokens,
        "requests_per_s": round(args.requests / wall, 2),
    }


def serve_part(model: str, rows: list[dict], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    api_key = "soak-" + secrets.token_urlsafe(16)
    print(f"serving: 3 jobs, then {args.requests} chat requests", flush=True)
    answered = Answered()
    with running_server(tmp / "serve-data", api_key) as server:
        client = server.client(timeout=900)
        with Sampler(server.proc.pid, answered, args.sample_seconds) as sampler:
            t0 = time.perf_counter()
            jobs = run_jobs(server, client, model, rows, tmp, args)
            jobs_wall = time.perf_counter() - t0
            first = len(sampler.samples)  # samples from here on belong to the chat burst
            burst = chat_burst(client, [j["model"] for j in jobs[-2:]], rows, answered, args)
            sampler.sample()  # one sample at the very end of the burst
    pid = server.proc.pid
    chat = sampler.samples[first:]
    xs = [s["x"] for s in chat]
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "jobs": jobs,
        "jobs_wall_s": round(jobs_wall, 1),
        "burst": burst,
        "tree": growth(xs, [s["total_mb"] for s in chat], args.requests, args.warmup_fraction),
        "server": growth(
            xs, [s["procs"].get(str(pid), 0.0) for s in chat], args.requests, args.warmup_fraction
        ),
        "peak_during_jobs_mb": max((s["total_mb"] for s in sampler.samples[:first]), default=None),
        "first_chat_sample": first,
        "samples": sampler.samples,
        "processes": sampler.processes,
        "server_pid": pid,
    }


# ---------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table_row(part: str, count: str, g: dict[str, Any]) -> str:
    if not g.get("points"):
        return f"| {part} | {count} | n/a | n/a | n/a | n/a | no |"
    rss = " / ".join(fmt(g[k]) for k in ("rss_warmup_end_mb", "rss_middle_mb", "rss_end_mb"))
    met = "yes" if g["target_met"] else "**no**"
    return f"| {part} | {count} | {rss} | {fmt(g['peak_mb'])} | {fmt(g['growth_pct'], 2)} | {met} |"


def markdown(report: dict[str, Any]) -> str:
    data = report["data"]
    chars, tokens = data["chars"], data["approx_tokens"]
    parts = [*report.get("train", []), report.get("serve") or {}]
    commands = " and ".join(sorted({f"`{p['bench_command']}`" for p in parts if "bench_command" in p}))
    lines = [
        "# Soak: RSS over long training runs and many requests",
        "",
        f"Model `{report['model']}`, {data['examples']} chat examples ({data['multi_turn']} multi-turn, "
        f"{chars['min']} to {chars['max']} characters, about {tokens['min']} to {tokens['max']} tokens). "
        f"Warm-up: the first {report['warmup_fraction']:.0%} of steps or requests. Growth: least-squares "
        "slope after warm-up, per 1,000 steps (training) or over all the requests (serving), as % of "
        f"the part's peak RSS; target under {TARGET_PCT:g}%. Reproduce with {commands}.",
        "",
        "| part | steps / requests | RSS at warm-up end / middle / end (MB) | peak (MB) | growth % "
        "| target met |",
        "|---|---|---|---|---|---|",
    ]
    for run in report.get("train", []):
        part = f"train, batch {run['batch']}"
        if "error" in run:
            lines.append(f"| {part} | {run['steps']} | failed: {run['error']} | | | **no** |")
            continue
        lines.append(
            table_row(f"{part} (loop's rss_mb, every step)", str(run["steps_done"]), run["per_step"])
        )
        secs = report["sample_seconds"]
        lines.append(
            table_row(f"{part} (process tree, every {secs:g} s)", str(run["steps_done"]), run["sampled"])
        )
    serve = report.get("serve")
    if serve and "error" in serve:
        lines.append(f"| serve | {serve.get('requests')} | failed: {serve['error']} | | | **no** |")
    elif serve:
        lines.append(table_row("serve (server + children)", str(serve["requests"]), serve["tree"]))
        lines.append(table_row("serve (server process)", str(serve["requests"]), serve["server"]))
    lines += ["", "![RSS against steps and requests](soak.png)", "", *notes(report)]
    return "\n".join(lines) + "\n"


def allocators(part: dict[str, Any]) -> str:
    """Which allocator each kind of process of a part ran on, by its `python -m` module."""
    seen = set()
    for info in part.get("processes", {}).values():
        words = info.get("command", "").split()
        module = words[words.index("-m") + 1] if "-m" in words[:-1] else (words[0] if words else "?")
        conf = f" ({info['malloc_conf']})" if info.get("malloc_conf") else ""
        seen.add(f"{module}: {info['allocator']}{conf}")
    return "; ".join(sorted(seen)) or "not seen"


def notes(report: dict[str, Any]) -> list[str]:
    lines = []
    for run in report.get("train", []):
        if "error" not in run:
            lines.append(
                f"- Training at batch {run['batch']}: {run['steps_done']} steps in {run['wall_s']:,.0f} s; "
                f"allocators: {allocators(run)}."
            )
    serve = report.get("serve") or {}
    if "jobs" in serve:
        walls = ", ".join(f"{j['wall_s']:,.0f}" for j in serve["jobs"])
        after = ", ".join(f"{j['server_rss_after_mb']:,.0f}" for j in serve["jobs"])
        burst = serve["burst"]
        lines += [
            f"- Serving: three jobs took {walls} s; the server's RSS after each: {after} MB. "
            f"{serve['requests']} chat requests from {serve['concurrency']} threads, `max_tokens` "
            f"{serve['max_tokens']}, took {burst['wall_s']:,.0f} s ({burst['requests_per_s']} requests/s); "
            f"allocators: {allocators(serve)}.",
        ]
    machine = report["machine"]
    lines.append(
        f"- Machine: {machine['cpu']['model']}, {machine['cpus']} CPUs, flags {machine['cpu']['flags']}, "
        f"torch {machine['torch']}, {machine['threads']} threads, matmul peaks {report['matmul_gflops']} "
        f"GFLOPS, load average at the start {machine['load_average']}; {report['when']}."
    )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in report.get("train", []):
        if "series" not in run:
            continue
        left.plot(run["series"]["step"], run["series"]["rss_mb"], label=f"batch {run['batch']}: loop rss_mb")
        xs = [s["x"] for s in run["samples"]]
        left.scatter(
            xs, [s["total_mb"] for s in run["samples"]], s=6, label=f"batch {run['batch']}: tree, sampled"
        )
    left.set(xlabel="optimizer step", ylabel="RSS (MB)", title="training")
    serve = report.get("serve") or {}
    chat = serve.get("samples", [])[serve.get("first_chat_sample", 0) :]
    if chat:
        pid = str(serve["server_pid"])
        right.plot(
            [s["x"] for s in chat], [s["total_mb"] for s in chat], marker=".", label="server + children"
        )
        right.plot(
            [s["x"] for s in chat], [s["procs"].get(pid, 0.0) for s in chat], marker=".", label="server"
        )
    right.set(xlabel="chat requests answered", ylabel="RSS (MB)", title="serving (after 3 fine-tuning jobs)")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, model dir, or `tiny` (random, smoke run)")
    p.add_argument("--steps-b1", type=int, default=1000, help="optimizer steps at batch 1")
    p.add_argument("--steps-b8", type=int, default=200, help="optimizer steps at batch 8")
    p.add_argument("--requests", type=int, default=500, help="chat requests after the jobs")
    p.add_argument("--concurrency", type=int, default=4, help="client threads sending chat requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--job-steps", type=int, default=30, help="max_steps of each fine-tuning job")
    p.add_argument("--job-examples", type=int, default=200, help="rows of the soak set uploaded for the jobs")
    p.add_argument("--job-timeout", type=float, default=1800, help="seconds one job may take")
    p.add_argument("--examples", type=int, default=1000, help="size of the chat set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-seconds", type=float, default=3.0, help="RSS sampling interval")
    p.add_argument("--warmup-fraction", type=float, default=WARMUP_FRACTION, help="left out of the fit")
    p.add_argument("--skip-train", action="store_true", help="keep the training part of OUT/soak.json")
    p.add_argument("--skip-serve", action="store_true", help="keep the serving part of OUT/soak.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    return p.parse_args(argv)


def run_parts(args: argparse.Namespace, previous: dict[str, Any]) -> dict[str, Any]:
    """The training runs and the serving part, in one temp dir; a failed part is recorded and the
    others still run (a soak takes hours: one failure should not void the rest). A skipped part keeps
    its result from the previous soak.json, so the two parts can be run at different times."""
    rows = build_soak_set(args.examples, args.seed)
    out: dict[str, Any] = {
        "data": length_stats(rows),
        "train": previous.get("train", []),
        "serve": previous.get("serve"),
    }
    stamp = {"bench_command": args.bench_command, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="tunery-soak-") as tmp_name:
        tmp = Path(tmp_name)
        model = str(make_tiny_model_dir(tmp / "tiny")) if args.model == "tiny" else args.model
        data = write_jsonl(tmp / "soak.jsonl", rows)
        if not args.skip_train:
            runs = [(1, args.steps_b1), (8, args.steps_b8)]
            out["train"] = [
                {**train_part(model, data, batch, steps, tmp, args), **stamp}
                for batch, steps in runs
                if steps
            ]
        if not args.skip_serve:
            try:
                out["serve"] = {**serve_part(model, rows, tmp, args), **stamp}
            except (RuntimeError, OSError, openai.OpenAIError) as exc:  # a failed job, a refused request
                out["serve"] = {"requests": args.requests, "error": str(exc)[-3000:], **stamp}
    return out


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for run in report.get("train", []):
        ok = "error" not in run and run["per_step"]["target_met"] and run["sampled"]["target_met"]
        out[f"train_b{run['batch']}"] = bool(ok)
    serve = report.get("serve")
    if serve:
        out["serve"] = "error" not in serve and serve["tree"]["target_met"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "soak.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    args.bench_command = "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "model": args.model,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "target_pct": TARGET_PCT,
        "warmup_fraction": args.warmup_fraction,
        "sample_seconds": args.sample_seconds,
        "machine": {**common.machine_info(), "cpu": cpu_info(), "psutil": psutil is not None},
        "matmul_gflops": {d: round(common.matmul_peak(d), 1) for d in ("fp32", "bf16")},
    }
    report.update(run_parts(args, previous))
    report["verdicts"] = verdicts(report)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    plot(report, args.out / "soak.png")
    print(markdown(report))
    return 0 if report["verdicts"] and all(report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
