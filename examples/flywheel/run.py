"""The data flywheel on smollm2-135m: serve a weak model, log its traffic, review it, train again.

    python examples/flywheel/run.py [--data-dir DIR] [--results FILE]

Everything goes through a real `tunery serve` on 127.0.0.1 with the official `openai` SDK, as an app
and its reviewers would use it. The task is `datasets/routing` (a customer message to one of five
teams). Steps:

1. v1: LoRA on smollm2-135m from a deliberately tiny file (10 examples), served as `support-router`.
2. Traffic: unseen messages sent through the alias with `store: true`.
3. Review: correct replies rated up; 20% of all replies corrected with the gold team (the others
   that were wrong are rated down with no correction, as a busy reviewer would leave them).
4. `POST /v1/tunery/datasets`: an SFT file from the reviewed logs, the newest 25% held out.
5. v2: a job that continues from v1 on that file.
6. `POST /v1/tunery/compare`: v1 against v2 on the held-out slice, and on a balanced sample of the
   bundled test split (messages no model or reviewer saw).
7. The alias is switched to v2. The table is printed and everything is written to results.json.

Any API error stops the script with exit status 1 and the server's message.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tunery.jobs.store import Store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(1, str(ROOT))  # the repository's test helpers: a real `tunery serve` on a free port
from tests.helpers.server import running_server  # noqa: E402

TASK = ROOT / "datasets" / "routing"
TEAMS = ["billing", "technical", "shipping", "account", "sales"]
BASE = "smollm2-135m"
ALIAS = "support-router"
APP = {"app": "flywheel-example"}  # the metadata that selects this app's traffic in the logs
ADMIN_KEY = "flywheel-admin"  # the server needs an admin key; the app itself uses an ordinary key
TERMINAL = ("succeeded", "failed", "cancelled")


class FlywheelError(Exception):
    """A step that did not do what the loop needs (a failed job, an empty review)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="server data dir, new or empty (default: a temp dir)")
    p.add_argument("--results", type=Path, help="where to write results.json (default: in the data dir)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--seed-examples", type=int, default=10, help="v1's training file: 2 per team by default")
    p.add_argument("--traffic", type=int, default=120, help="simulated requests through the alias")
    p.add_argument("--correct-share", type=float, default=0.2, help="share of all replies corrected")
    p.add_argument("--test-fraction", type=float, default=0.25, help="newest share of the logs held out")
    p.add_argument("--v1-epochs", type=int, default=4)
    p.add_argument("--v2-epochs", type=int, default=2)
    p.add_argument("--lr-multiplier", type=float, default=0.25, help="x 2e-4 / 0.1: LoRA's rate at 0.1")
    p.add_argument(
        "--test-examples", type=int, default=25, help="balanced test-split sample to compare on (0: skip)"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------- the task's data


def load_task(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (TASK / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def split_task(rows: list[dict], n_seed: int, n_traffic: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(v1's tiny training set, the traffic): disjoint, both from the train split, in a seeded order.
    The tiny set takes the same number of each team so v1 has seen every label at least once."""
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    per_team = max(1, n_seed // len(TEAMS))
    tiny: list[dict] = []
    for team in TEAMS:
        tiny += [r for r in rows if label_of(r) == team][:per_team]
    chosen = {id(r) for r in tiny}
    traffic = [r for r in rows if id(r) not in chosen][:n_traffic]
    if len(traffic) < n_traffic:
        raise FlywheelError(f"the routing train split has only {len(traffic)} messages left for traffic")
    return tiny, traffic


def label_of(row: dict) -> str:
    return row["messages"][-1]["content"]


def prompt_of(row: dict) -> list[dict]:
    return row["messages"][:-1]


def balanced_sample(rows: list[dict], n: int) -> list[dict]:
    """The first n // 5 messages of each team, in file order: the same sample on every run."""
    return [r for team in TEAMS for r in [r for r in rows if label_of(r) == team][: n // len(TEAMS)]]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ---------------------------------------------------------------- the server's API


def post(client: openai.OpenAI, path: str, body: dict) -> dict:
    """Tunery's extension endpoints through the SDK's generic `post`, which raises on any error."""
    return client.post(path, body=body, cast_to=httpx.Response).json()


def upload(client: openai.OpenAI, name: str, rows: list[dict]) -> str:
    return client.files.create(file=(name, jsonl(rows)), purpose="fine-tune").id


def fine_tune(client: openai.OpenAI, model: str, file_id: str, suffix: str, epochs: int, args) -> dict:
    """A LoRA job (the server's default method), followed until it ends; returns the finished job."""
    t0 = time.perf_counter()
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=file_id,
        suffix=suffix,
        seed=args.seed,
        hyperparameters={"n_epochs": epochs, "batch_size": 1, "learning_rate_multiplier": args.lr_multiplier},
    )
    shown = 0
    while job.status not in TERMINAL:
        time.sleep(3)
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        steps = [e.message for e in events if e.message.startswith("Step ")]
        if steps and len(steps) != shown:  # events come newest first: steps[0] is the latest
            shown = len(steps)
            print(f"    {steps[0]}", flush=True)
    if job.status != "succeeded":
        raise FlywheelError(f"job {job.id} ended {job.status}: {job.error}")
    seconds = time.perf_counter() - t0
    print(f"  {job.fine_tuned_model}: {job.trained_tokens} tokens trained in {seconds:.0f} s", flush=True)
    return {
        "job": job.id,
        "model": job.fine_tuned_model,
        "from": model,
        "epochs": epochs,
        "trained_tokens": job.trained_tokens,
        "seconds": round(seconds, 1),
    }


def ask(client: openai.OpenAI, model: str, row: dict, **kw: Any):
    return client.chat.completions.create(
        model=model, messages=prompt_of(row), max_tokens=4, temperature=0, **kw
    )


def simulate_traffic(client: openai.OpenAI, traffic: list[dict]) -> tuple[list[dict], float]:
    """Every message through the alias, stored with the app's metadata: (what was served, seconds)."""
    served = []
    t0 = time.perf_counter()
    for i, row in enumerate(traffic, 1):
        done = ask(client, ALIAS, row, store=True, metadata=APP)
        served.append({"id": done.id, "reply": done.choices[0].message.content or "", "gold": label_of(row)})
        if i % 20 == 0 or i == len(traffic):
            right = sum(s["reply"].strip() == s["gold"] for s in served)
            print(f"  {i} requests, {right} routed right so far", flush=True)
    return served, round(time.perf_counter() - t0, 1)


def review(client: openai.OpenAI, served: list[dict], share: float, seed: int) -> dict:
    """The reviewer: a reply that is exactly the right team is rated up. Of the wrong ones, a seeded
    sample of `share` x all replies gets the right team as a correction; the rest are rated down."""
    wrong = [s for s in served if s["reply"].strip() != s["gold"]]
    n_fix = min(len(wrong), round(share * len(served)))
    fixed = {s["id"] for s in random.Random(seed).sample(wrong, n_fix)}
    for s in served:
        body: dict[str, Any] = {"completion_id": s["id"], "rating": "up"}
        if s["reply"].strip() != s["gold"]:
            body["rating"] = "down"
            if s["id"] in fixed:
                body["corrected"] = s["gold"]
        post(client, "/tunery/feedback", body)
    counts = {"up": len(served) - len(wrong), "corrected": n_fix, "down": len(wrong) - n_fix}
    print(f"  rated up {counts['up']}, corrected {counts['corrected']}, down {counts['down']}", flush=True)
    return counts


def build_dataset(client: openai.OpenAI, test_fraction: float) -> dict:
    """The SFT file from this app's reviewed logs; the newest `test_fraction` is the held-out slice."""
    body = {"model": ALIAS, "metadata": APP, "shape": "sft", "test_fraction": test_fraction}
    built = post(client, "/tunery/datasets", body)
    test = built["tunery"]["test_file"]
    if test is None:
        raise FlywheelError("the dataset has no held-out slice; raise --traffic or --test-fraction")
    report = built["tunery"]["report"]
    print(f"  train {report['train']}, held out {report['test']}; kept {report['kept']}", flush=True)
    return {"train_file": built["id"], "test_file": test["id"], "report": report}


def compare(client: openai.OpenAI, file_id: str, v1: str, v2: str) -> dict:
    # max_new_tokens as the traffic asked for, so v1 answers here as it did when it was served
    return post(client, "/tunery/compare", {"file": file_id, "models": [v1, v2], "max_new_tokens": 4})


def accuracies(result: dict) -> str:
    return ", ".join(f"{m['label']} {m['accuracy']:.1%}" for m in result["models"])


def set_alias(client: openai.OpenAI, model: str) -> dict:
    return post(client, f"/tunery/aliases/{ALIAS}", {"model": model})


# ---------------------------------------------------------------- the loop


def start_key(data_dir: Path) -> str:
    """An ordinary (non-admin) key, as an app would get from the operator (`tunery keys create`)."""
    store = Store(data_dir)
    try:
        return store.create_key("support-app")[1]
    finally:
        store.close()


def run_loop(client: openai.OpenAI, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Steps 1-7 of the module docstring, recorded in `out` as they finish (kept if a later one fails)."""
    tiny, traffic = split_task(load_task("train"), args.seed_examples, args.traffic, args.seed)
    out.update({"v1_train_examples": len(tiny), "traffic": len(traffic)})
    print(f"1. v1: LoRA on {BASE} from {len(tiny)} examples", flush=True)
    tiny_file = upload(client, "routing-tiny.jsonl", tiny)
    out["v1"] = fine_tune(client, BASE, tiny_file, "v1", args.v1_epochs, args)
    v1 = out["v1"]["model"]
    set_alias(client, v1)
    print(f"2. traffic: {len(traffic)} messages through {ALIAS!r} (-> {v1}), stored", flush=True)
    served, out["traffic_seconds"] = simulate_traffic(client, traffic)
    out["v1_served_accuracy"] = round(sum(s["reply"].strip() == s["gold"] for s in served) / len(served), 4)
    print("3. review", flush=True)
    out["review"] = review(client, served, args.correct_share, args.seed)
    print("4. dataset from the logs", flush=True)
    out["dataset"] = build_dataset(client, args.test_fraction)
    print(f"5. v2: continue {v1} on the reviewed logs", flush=True)
    out["v2"] = fine_tune(client, v1, out["dataset"]["train_file"], "v2", args.v2_epochs, args)
    v2 = out["v2"]["model"]
    print("6. compare v1 and v2", flush=True)
    out["heldout"] = compare(client, out["dataset"]["test_file"], v1, v2)
    print(f"  held-out slice: {accuracies(out['heldout'])}", flush=True)
    if args.test_examples:
        sample = balanced_sample(load_task("test"), args.test_examples)
        out["test_split"] = compare(client, upload(client, "routing-test-sample.jsonl", sample), v1, v2)
        print(f"  test split sample: {accuracies(out['test_split'])}", flush=True)
    print(f"7. switch {ALIAS!r} to v2", flush=True)
    switched = set_alias(client, v2)
    if (switched["model"], switched["previous_model"]) != (v2, v1):
        raise FlywheelError(f"the alias did not switch: {switched}")
    out["alias"] = {"name": ALIAS, "model": v2, "previous_model": v1}


def table(out: dict[str, Any]) -> str:
    """The before/after table (Markdown), one row per model and evaluation set."""
    sets = [("held-out slice of the logs", out["heldout"])]
    if "test_split" in out:
        sets.append((f"datasets/routing/test.jsonl ({out['test_split']['n']} of 150)", out["test_split"]))
    names = {out["v1"]["model"]: "v1", out["v2"]["model"]: "v2"}
    lines = [
        "| evaluated on | model | n | exact match | accuracy | macro F1 | off-label | latency p50 (ms) "
        "| prompt tokens (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for title, result in sets:
        for row in result["models"]:
            lines.append(
                f"| {title} | {names[row['label']]} | {result['n']} | {row['exact_match']:.1%} "
                f"| {row['accuracy']:.1%} | {row['macro_f1']:.3f} | {row['invalid']} "
                f"| {row['latency_ms']['p50']:.0f} | {row['prompt_tokens']['mean']:.1f} |"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tunery-flywheel-"))
    if data_dir.exists() and any(data_dir.iterdir()):
        print(f"error: {data_dir} is not empty; the example needs a fresh server data dir", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"server data dir: {data_dir}", flush=True)
    key = start_key(data_dir)
    results = args.results or data_dir / "results.json"
    out: dict[str, Any] = {}
    try:
        with running_server(data_dir, ADMIN_KEY) as server:
            # Long timeouts: a comparison is one request that answers every example, minutes on a CPU.
            client = server.client(key, timeout=1800)
            try:
                run_loop(client, args, out)
            except (openai.APIError, FlywheelError):
                print(f"--- server log (tail) ---\n{server.log()[-3000:]}", file=sys.stderr)
                raise
    except (openai.APIError, FlywheelError, RuntimeError) as exc:
        status = f"the API answered {exc.status_code}: " if isinstance(exc, openai.APIStatusError) else ""
        print(f"error: {status}{exc}", file=sys.stderr)
        results.with_suffix(".partial.json").write_text(json.dumps(out, indent=2) + "\n")
        return 1
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "results")},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        **out,
    }
    results.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{table(out)}\n\nwall time {out['wall_seconds'] / 60:.1f} min; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
