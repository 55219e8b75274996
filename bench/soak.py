"""Soak benchmark: is memory bounded over runs of the length users run (issue 20)?

    python bench/soak.py                                          # smollm2-135m: the real soak
    python bench/soak.py --model tiny --steps-b1 60 --steps-b8 10 --requests 40 --out /tmp/soak  # smoke
    python bench/soak.py --only b8           # batch 8 only; the other parts of OUT/soak.json are kept
    python bench/soak.py --skip-serve        # training only; the serving part of OUT/soak.json is kept

Parts: `b1` (training at batch 1), `b8` (training at batch 8) and `serve`, run in that order. A part
that is not run keeps its result from OUT/soak.json, so parts can be measured at different times:
`--only b8` (or `--only b1 serve`) runs just those; `--steps-b1 0`, `--steps-b8 0`, `--requests 0`,
`--skip-train` and `--skip-serve` leave parts out. Parts are only kept from a soak.json of the same
model, data and warm-up (otherwise the script stops before running anything); with nothing left to
run, it rewrites OUT/soak.md and OUT/soak.png from OUT/soak.json. Each part records its own date,
command and load average, and soak.md lists them, so the reader sees which run measured what.
OUT/soak.{json,md,png} are rewritten after every part: a soak stopped by hand (Ctrl-C, or SIGTERM
from `timeout`) keeps the parts already done and records the running one as stopped, with the steps
and RSS samples it had.

Data: about 1,000 chat examples built deterministically from the bundled datasets (chat_bench,
sentiment, routing, qa, extraction, rewrite): most are one conversation, the rest join two to eight
conversations into one multi-turn example, so lengths run from about 30 to about 1,000 tokens and
almost every step has a new shape, which is what made jemalloc without decay grow (issue 20).

Training: `python -m tunery.cli train` in a child process, as a user runs it, so the allocator
re-exec applies (os.execve: the pid stays): `--steps-b1` optimizer steps at batch 1, then
`--steps-b8` at batch 8. RSS per step is the loop's own `rss_mb` in metrics.jsonl; the RSS of the
whole process tree is also sampled from outside every `--sample-seconds`, to catch what the loop
does not see (loading, saving).

Serving: one `tunery serve` on 127.0.0.1 (a free port, an API key, its own data dir) runs three
fine-tuning jobs back to back through the official `openai` SDK, then answers `--requests` chat
requests alternating over two of the resulting `ft:` models from `--concurrency` client threads.
The RSS of the server and of every child (the job workers) is sampled throughout (rss_sampler.py).

Analysis: the first 10% of steps (or requests) are warm-up. A least-squares line through the rest
gives the growth per 1,000 steps (training) or over all the requests (serving), as a percentage of
the part's peak RSS. Target: under 2%. A figure that cannot be made (no samples, or one after the
warm-up) says why in soak.md and is not a pass. Writes OUT/soak.json, OUT/soak.md and OUT/soak.png
(RSS against steps for each training run, RSS against requests for the server). Exits 1 when a part
run this time failed, missed the target or lacks a figure; 130 when stopped by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import signal
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


def fit_slope_given(xs: list[float], ys: list[float], sizes: list[float]) -> float | None:
    """Least-squares slope of ys against xs with `sizes` as a second variable (ys ~ a + b*x + c*size):
    the growth per x at a fixed batch size. None when the two cannot be told apart (too few points, or
    sizes constant or in step with x)."""
    import numpy as np

    if not len(xs) == len(ys) == len(sizes):
        raise ValueError(f"{len(xs)} x values, {len(ys)} y values and {len(sizes)} sizes")
    design = np.column_stack([np.ones(len(xs)), np.asarray(xs, float), np.asarray(sizes, float)])
    if len(xs) < 4 or np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, np.asarray(ys, float), rcond=None)
    return float(coef[1])


def growth(
    xs: list[float],
    ys: list[float],
    per: float,
    warmup_fraction: float = WARMUP_FRACTION,
    target: float = TARGET_PCT,
    sizes: list[float] | None = None,
) -> dict[str, Any]:
    """RSS growth after warm-up, as MB and as % of the peak, over `per` units of x.

    xs are steps (or completed requests), ys RSS in MB. Points with x under `warmup_fraction` of the
    last x are warm-up (the model loading, the allocator filling its first arenas) and are left out
    of the fit, but not of the peak: the peak is the most the run ever held.

    `sizes`, when given, is each point's batch size in token positions. At batch 8 the RSS after a step
    follows the batch just run by hundreds of MB, so a plain fit over 200 steps reads the order of the
    batches as growth or shrinkage. The slope then comes from a fit with the size as a second variable
    (growth at a fixed batch size); the plain slope is kept beside it as `unadjusted_slope_mb`.
    """
    if len(xs) != len(ys) or (sizes is not None and len(sizes) != len(xs)):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    empty = {"points": 0, "growth_mb": None, "growth_pct": None, "target_met": False}
    if not xs:
        return empty
    start = warmup_fraction * max(xs)
    kept = sorted((i for i, x in enumerate(xs) if x >= start), key=lambda i: xs[i])  # after warm-up
    kx, ky = [xs[i] for i in kept], [ys[i] for i in kept]
    plain = fit_slope(kx, ky)
    slope = plain if sizes is None else fit_slope_given(kx, ky, [sizes[i] for i in kept])
    peak = max(ys)
    growth_mb = None if slope is None else slope * per
    pct = None if growth_mb is None or peak <= 0 else 100 * growth_mb / peak

    def at(x_target: float) -> float:
        return ky[min(range(len(kx)), key=lambda j: abs(kx[j] - x_target))]

    return {
        "points": len(kept),
        "warmup_end": start,
        "per": per,
        "slope_mb": slope,
        **({"unadjusted_slope_mb": plain, "adjusted_for": "batch_positions"} if sizes is not None else {}),
        "growth_mb": growth_mb,
        "growth_pct": pct,
        "peak_mb": peak,
        "rss_warmup_end_mb": ky[0],
        "rss_middle_mb": at((start + kx[-1]) / 2),
        "rss_end_mb": ky[-1],
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
            try:  # this runs in the sampler's thread: an exception there would end the sampling
                self.step = max(self.step, int(json.loads(line).get("step") or 0))
            except (ValueError, TypeError, AttributeError):
                continue
        return self.step


class Stopped(Exception):
    """The soak was stopped by hand (Ctrl-C, or SIGTERM from `timeout` or `kill`)."""


class StopSignals:
    """SIGINT and SIGTERM while the soak runs. Both set `event`; outside a training child's run they
    also raise Stopped at once. While a child trains they only set the flag, which `run_sampled`
    polls: the main thread is then blocked waiting for the child, and a signal delivered to the
    sampler's thread would raise only once the child had exited, somewhere after the wait, too late
    to record the part as stopped (`timeout` signals the whole process group: the child stops too)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.raising = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.event.set()
        if self.raising:
            raise Stopped


STOP = StopSignals()


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


def run_sampled(cmd: list[str], log_path: Path, metrics: Path, interval: float) -> dict[str, Any]:
    """Run `cmd` with its process tree sampled. Stopped by hand (STOP), the child is asked to stop
    (it checkpoints at the next step boundary) and the run is reported as `interrupted`, with what
    was sampled until then."""
    t0 = time.perf_counter()
    STOP.raising = False
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            with Sampler(proc.pid, MetricsTail(metrics), interval) as sampler:
                while proc.poll() is None and not STOP.event.is_set():
                    STOP.event.wait(1.0)
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=180)  # a batch-8 step of the real model takes ~15 s, then a save
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        STOP.raising = True
    return {
        "returncode": proc.returncode,
        "interrupted": STOP.event.is_set(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "samples": sampler.samples,
        "processes": sampler.processes,
    }


def sampled_note(samples: list[dict[str, Any]], g: dict[str, Any]) -> str | None:
    """Why the process-tree samples give no growth figure; None when they give one."""
    if g.get("growth_pct") is not None:
        return None
    if not samples:
        return "no sample: the process had exited before the first one"
    return (
        f"{len(samples)} samples, {g.get('points', 0)} after warm-up: too few for a slope "
        "(the run was shorter than a few sample intervals)"
    )


def train_fits(series: dict[str, list], samples: list[dict[str, Any]], warmup_fraction: float) -> dict:
    """A training part's two growth figures, from what it recorded (`series`: the metrics rows;
    `samples`: the process tree's). With the steps' sizes known, each fit takes a size as a second
    variable: the loop's RSS after a step follows the step just run, and a sample taken during a step
    holds that step's activations (at batch 1 one 900-token example lifts the tree by hundreds of MB),
    so the size of the step in flight (the one after the last step logged) goes with each sample."""
    xs, sizes = series["step"], series.get("batch_positions")
    per_step = growth(xs, series["rss_mb"], STEPS_PER, warmup_fraction, sizes=sizes)
    in_flight = None
    if sizes:
        size_of = dict(zip(xs, sizes, strict=True))
        in_flight = [size_of.get(s["x"] + 1, size_of.get(s["x"], 0)) for s in samples]
    sx, sy = [s["x"] for s in samples], [s["total_mb"] for s in samples]
    sampled = growth(sx, sy, STEPS_PER, warmup_fraction, sizes=in_flight)
    return {"per_step": per_step, "sampled": sampled, "sampled_note": sampled_note(samples, sampled)}


def logged_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; none when it was never written, less a last row cut by a kill."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def train_part(model: str, data: Path, batch: int, steps: int, tmp: Path, args: argparse.Namespace) -> dict:
    run_dir = tmp / f"train-b{batch}"
    n_examples = sum(1 for _ in data.open())
    cmd = train_command(model, data, run_dir, batch, steps, n_examples, tiny=args.model == "tiny")
    log_path = tmp / f"train-b{batch}.log"
    metrics = run_dir / "metrics.jsonl"
    print(f"training: batch {batch}, {steps} steps", flush=True)
    child = run_sampled(cmd, log_path, metrics, args.sample_seconds)
    rows = [r for r in logged_rows(metrics) if "rss_mb" in r]
    step_x, step_rss = [r["step"] for r in rows], [r["rss_mb"] for r in rows]
    # each step's largest micro-batch (train/loop.py): the fit separates its effect from growth
    sizes = [r["batch_positions"] for r in rows] if all("batch_positions" in r for r in rows) else None
    series = {"step": step_x, "rss_mb": step_rss, **({"batch_positions": sizes} if sizes else {})}
    out = {
        "batch": batch,
        "steps": steps,
        "steps_done": step_x[-1] if step_x else 0,
        "wall_s": child["wall_s"],
        "command": " ".join(cmd[1:]),
        **train_fits(series, child["samples"], args.warmup_fraction),
        "series": series,
        "samples": child["samples"],
        "processes": child["processes"],
    }
    if child["interrupted"]:
        return {**out, "error": f"stopped by hand after {out['steps_done']} steps", "interrupted": True}
    if child["returncode"] != 0 or not rows:
        tail = log_path.read_text(errors="replace")[-3000:]
        return {**out, "error": f"exit code {child['returncode']}", "log_tail": tail}
    return out


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
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        tokens = sum(pool.map(ask, range(args.requests)))
    finally:  # stopped by hand: the requests in flight finish, the queued ones are dropped
        pool.shutdown(cancel_futures=True)
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


def table_row(part: str, count: str, g: dict[str, Any], why: str | None = None) -> str:
    """One row of soak.md's table; a figure that could not be made says why, and is no verdict."""
    if g.get("growth_pct") is None:
        points = g.get("points", 0)
        why = why or (f"{points} points after warm-up, too few for a slope" if points else "no points")
        return f"| {part} | {count} | n/a: {why} | {fmt(g.get('peak_mb'))} | n/a | n/a |"
    rss = " / ".join(fmt(g[k]) for k in ("rss_warmup_end_mb", "rss_middle_mb", "rss_end_mb"))
    met = "yes" if g["target_met"] else "**no**"
    return f"| {part} | {count} | {rss} | {fmt(g['peak_mb'])} | {fmt(g['growth_pct'], 2)} | {met} |"


def not_sampled(run: dict[str, Any]) -> str | None:
    """Why a training part has no process-tree figure: its own note, or (a part written before the
    notes, or by hand) that no samples were kept with it."""
    if run.get("sampled_note"):
        return run["sampled_note"]
    return None if run.get("samples") else "no process-tree samples were kept with this part"


def train_rows(run: dict[str, Any], report: dict[str, Any]) -> list[str]:
    part = f"train, batch {run['batch']}"
    if "error" in run:
        done = f" ({run['steps_done']} done)" if "steps_done" in run else ""
        failed = "" if str(run["error"]).startswith("stopped") else "failed: "
        return [f"| {part} | {run['steps']}{done} | {failed}{run['error']} | | | **no** |"]
    secs = run.get("sample_seconds", report["sample_seconds"])
    count = str(run["steps_done"])
    return [
        table_row(f"{part} (loop's rss_mb, every step)", count, run["per_step"]),
        table_row(f"{part} (process tree, every {secs:g} s)", count, run["sampled"], not_sampled(run)),
    ]


def markdown(report: dict[str, Any]) -> str:
    data = report["data"]
    chars, tokens = data["chars"], data["approx_tokens"]
    lines = [
        "# Soak: RSS over long training runs and many requests",
        "",
        f"Model `{report['model']}`, {data['examples']} chat examples ({data['multi_turn']} multi-turn, "
        f"{chars['min']} to {chars['max']} characters, about {tokens['min']} to {tokens['max']} tokens). "
        f"Warm-up: the first {report['warmup_fraction']:.0%} of steps or requests. Growth: least-squares "
        "slope after warm-up, per 1,000 steps (training) or over all the requests (serving), as % of "
        f"the part's peak RSS; target under {TARGET_PCT:g}%. Parts may come from different runs of "
        "`bench/soak.py` (`--only`); each one's date and command are listed under the figure.",
        "",
        "| part | steps / requests | RSS at warm-up end / middle / end (MB) | peak (MB) | growth % "
        "| target met |",
        "|---|---|---|---|---|---|",
    ]
    for run in report.get("train", []):
        lines += train_rows(run, report)
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


def provenance(part: dict[str, Any]) -> str:
    """The run that measured a part: when, under what load, with which command."""
    load = f", load average at its start {part['load_average']}" if part.get("load_average") else ""
    command = f"`{part['bench_command']}`" if part.get("bench_command") else "an unrecorded command"
    return f"Measured {part.get('when', 'at an unrecorded date')}{load}, by {command}."


def train_note(run: dict[str, Any]) -> str:
    head = f"- Training at batch {run['batch']}: "
    if "error" in run:
        done = f", in {run['wall_s']:,.0f} s" if "wall_s" in run else ""
        head += f"{run['error']} (asked for {run['steps']} steps{done}); "
    else:
        head += f"{run['steps_done']} steps in {run['wall_s']:,.0f} s; "
    return head + f"allocators: {allocators(run)}. {provenance(run)}"


def notes(report: dict[str, Any]) -> list[str]:
    lines = [train_note(run) for run in report.get("train", [])]
    serve = report.get("serve") or {}
    if "jobs" in serve:
        walls = ", ".join(f"{j['wall_s']:,.0f}" for j in serve["jobs"])
        after = ", ".join(f"{j['server_rss_after_mb']:,.0f}" for j in serve["jobs"])
        burst = serve["burst"]
        lines += [
            f"- Serving: three jobs took {walls} s; the server's RSS after each: {after} MB. "
            f"{serve['requests']} chat requests from {serve['concurrency']} threads, `max_tokens` "
            f"{serve['max_tokens']}, took {burst['wall_s']:,.0f} s ({burst['requests_per_s']} requests/s); "
            f"allocators: {allocators(serve)}. {provenance(serve)}",
        ]
    elif serve:
        lines.append(f"- Serving: {serve.get('error')}. {provenance(serve)}")
    machine = report["machine"]
    lines.append(
        f"- Machine: {machine['cpu']['model']}, {machine['cpus']} CPUs, flags {machine['cpu']['flags']}, "
        f"torch {machine['torch']}, {machine['threads']} threads, matmul peaks {report['matmul_gflops']} "
        f"GFLOPS at {report['when']} (the last run that measured a part)."
    )
    return lines


def plot_training(ax: Any, report: dict[str, Any]) -> None:
    for run in report.get("train", []):
        series = run.get("series") or run.get("series_partial")  # a stopped part keeps what it logged
        if not series:
            continue
        label = f"batch {run['batch']}" + (" (stopped)" if "error" in run else "")
        label += f", {str(run['when'])[:10]}" if run.get("when") else ""
        ax.plot(series["step"], series["rss_mb"], label=f"{label}: loop rss_mb")
        if run.get("samples"):
            samples = run["samples"]
            ax.scatter(
                [s["x"] for s in samples], [s["total_mb"] for s in samples], s=6, label=f"{label}: tree"
            )
    ax.set(xlabel="optimizer step", ylabel="RSS (MB)", title="training")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_training(left, report)
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
    elif not serve.get("jobs"):
        why = f": {str(serve.get('error'))[:60]}" if serve else ""
        right.text(0.5, 0.5, "no serving part" + why, ha="center", transform=right.transAxes)
    title = "serving (after 3 fine-tuning jobs)" + (
        f", {str(serve['when'])[:10]}" if serve.get("when") else ""
    )
    right.set(xlabel="chat requests answered", ylabel="RSS (MB)", title=title)
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(*figures: dict[str, Any]) -> bool | None:
    """True when every figure meets the target, False when one misses it, None when one is missing."""
    if any(g.get("growth_pct") is not None and not g["target_met"] for g in figures):
        return False
    return None if any(g.get("growth_pct") is None for g in figures) else True


def verdicts(report: dict[str, Any]) -> dict[str, bool | None]:
    """Per part: true, false (failed, or a figure over the target), or null (a figure is missing)."""
    out = {}
    for run in report.get("train", []):
        out[f"train_b{run['batch']}"] = False if "error" in run else verdict(run["per_step"], run["sampled"])
    serve = report.get("serve")
    if serve:
        out["serve"] = False if "error" in serve else verdict(serve["tree"])
    return out


def write_report(report: dict[str, Any], out: Path) -> None:
    """OUT/soak.json (replaced whole, so a stop mid-write leaves the previous one), .md and .png."""
    report["verdicts"] = verdicts(report)
    tmp = out / "soak.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "soak.json")
    (out / "soak.md").write_text(markdown(report))
    plot(report, out / "soak.png")


# ---------------------------------------------------------------- main

PARTS = ("b1", "b8", "serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, model dir, or `tiny` (random, smoke run)")
    p.add_argument("--steps-b1", type=int, default=1000, help="optimizer steps at batch 1 (0: keep b1)")
    p.add_argument("--steps-b8", type=int, default=200, help="optimizer steps at batch 8 (0: keep b8)")
    p.add_argument("--requests", type=int, default=500, help="chat requests after the jobs (0: keep serve)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads sending chat requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--job-steps", type=int, default=30, help="max_steps of each fine-tuning job")
    p.add_argument("--job-examples", type=int, default=200, help="rows of the soak set uploaded for the jobs")
    p.add_argument("--job-timeout", type=float, default=1800, help="seconds one job may take")
    p.add_argument("--examples", type=int, default=1000, help="size of the chat set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-seconds", type=float, default=3.0, help="RSS sampling interval")
    p.add_argument("--warmup-fraction", type=float, default=WARMUP_FRACTION, help="left out of the fit")
    p.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="run only these parts; the others are kept from OUT/soak.json",
    )
    p.add_argument("--skip-train", action="store_true", help="keep the training parts of OUT/soak.json")
    p.add_argument("--skip-serve", action="store_true", help="keep the serving part of OUT/soak.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    return p.parse_args(argv)


def selected_parts(args: argparse.Namespace) -> list[str]:
    """The parts this run measures, in order; every other part is kept from OUT/soak.json."""
    left_out = {
        "b1": args.skip_train or args.steps_b1 <= 0,
        "b8": args.skip_train or args.steps_b8 <= 0,
        "serve": args.skip_serve or args.requests <= 0,
    }
    return [p for p in PARTS if p in (args.only or PARTS) and not left_out[p]]


def kept_parts(previous: dict[str, Any], report: dict[str, Any], parts: list[str], out: Path) -> tuple:
    """The training runs and the serving part of `previous` that this run does not measure again.
    They must be of the same model, data and warm-up as this run, or the merged report would mix
    two soaks: stop before anything runs."""
    train = [t for t in previous.get("train", []) if f"b{t['batch']}" not in parts]
    serve = None if "serve" in parts else previous.get("serve")
    clash = [k for k in ("model", "data", "warmup_fraction") if k in previous and previous[k] != report[k]]
    if (train or serve) and clash:
        kept = [f"b{t['batch']}" for t in train] + (["serve"] if serve else [])
        raise SystemExit(
            f"{out / 'soak.json'} differs from this run in {', '.join(clash)}: its parts {', '.join(kept)} "
            f"cannot be kept. Run every part (--only {' '.join(PARTS)}) or use another --out."
        )
    # a kept training part is fitted again from its recorded series and samples, so that every part
    # of one report is read by the same analysis (a part that failed has no figures to refit)
    refit = [
        {**t, **train_fits(t["series"], t["samples"], report["warmup_fraction"])}
        if "error" not in t and "series" in t and "samples" in t
        else t
        for t in train
    ]
    return refit, serve


def restore_unreached(report: dict[str, Any], previous: dict[str, Any]) -> None:
    """After a stop: the parts this run never reached keep their result in `previous` (when it is
    of the same soak), rather than vanish from soak.json."""
    if any(previous.get(k) != report[k] for k in ("model", "data", "warmup_fraction")):
        return
    reached = {t["batch"] for t in report["train"]}
    unreached = [t for t in previous.get("train", []) if t["batch"] not in reached]
    report["train"] = sorted([*report["train"], *unreached], key=lambda t: t["batch"])
    if report.get("serve") is None:
        report["serve"] = previous.get("serve")


def run_part(
    name: str, model: str, data: Path, rows: list[dict], tmp: Path, args: argparse.Namespace
) -> dict:
    if name != "serve":
        batch = int(name[1:])
        return train_part(model, data, batch, getattr(args, f"steps_b{batch}"), tmp, args)
    try:
        return serve_part(model, rows, tmp, args)
    except (RuntimeError, OSError, openai.OpenAIError) as exc:  # a failed job, a refused request
        return {"requests": args.requests, "error": str(exc)[-3000:]}
    except (KeyboardInterrupt, Stopped):
        return {"requests": args.requests, "error": "stopped by hand", "interrupted": True}


def run_parts(args: argparse.Namespace, parts: list[str], rows: list[dict], report: dict[str, Any]) -> bool:
    """Each part in turn, in one temp dir, written to OUT as soon as it is done; a failed part is
    recorded and the others still run (a soak takes hours: one failure should not void the rest).
    Returns True when stopped by hand (the part then running is recorded as stopped)."""
    with tempfile.TemporaryDirectory(prefix="tunery-soak-") as tmp_name:
        tmp = Path(tmp_name)
        model = str(make_tiny_model_dir(tmp / "tiny")) if args.model == "tiny" else args.model
        data = write_jsonl(tmp / "soak.jsonl", rows)
        for name in parts:
            stamp = {
                "bench_command": args.bench_command,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "sample_seconds": args.sample_seconds,
            }
            result = {**run_part(name, model, data, rows, tmp, args), **stamp}
            if name == "serve":
                report["serve"] = result
            else:
                others = [t for t in report["train"] if t["batch"] != result["batch"]]
                report["train"] = sorted([*others, result], key=lambda t: t["batch"])
            write_report(report, args.out)
            if result.get("interrupted"):
                return True
    return False


def new_report(
    args: argparse.Namespace, rows: list[dict], previous: dict[str, Any], parts: list[str]
) -> dict:
    report: dict[str, Any] = {
        "model": args.model,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "target_pct": TARGET_PCT,
        "warmup_fraction": args.warmup_fraction,
        "sample_seconds": args.sample_seconds,
        "data": length_stats(rows),
    }
    report["train"], report["serve"] = kept_parts(previous, report, parts, args.out)
    if parts or "machine" not in previous:
        report["machine"] = {**common.machine_info(), "psutil": psutil is not None}
        report["matmul_gflops"] = {d: round(common.matmul_peak(d), 1) for d in ("fp32", "bf16")}
    else:  # only rewriting soak.md and soak.png: the machine as the last run measured it
        for key in ("machine", "matmul_gflops", "when"):
            report[key] = previous[key]
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.bench_command = "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "soak.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    parts = selected_parts(args)
    rows = build_soak_set(args.examples, args.seed)
    report = new_report(args, rows, previous, parts)
    print(f"parts run: {', '.join(parts) or 'none (rewriting soak.md, soak.png)'}", flush=True)
    try:
        with STOP:
            stopped = run_parts(args, parts, rows, report) if parts else False
    except Stopped:  # between parts, or while one was being written: the report is written below
        stopped = True
    if stopped:
        restore_unreached(report, previous)
    write_report(report, args.out)
    print(markdown(report))
    if stopped:
        return 130
    mine = [report["verdicts"].get("serve" if p == "serve" else f"train_{p}") for p in parts]
    return 0 if all(v is True for v in mine) else 1


if __name__ == "__main__":
    sys.exit(main())
