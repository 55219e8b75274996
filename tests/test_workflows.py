"""Data and experiment workflows: stats/leakage, synth, trackers, sweep, recommend (tiny models)."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tunery.data.stats import data_stats, duplicates, leakage
from tunery.data.synth import SynthSettings, _Filter, parse_pair, parse_score
from tunery.data.types import Conversation


def _app() -> typer.Typer:
    from tunery.cli import app

    return app


def _conv(user: str, reply: str, line: int = 0) -> Conversation:
    return Conversation(
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], line=line
    )


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


REVIEWS = [
    "the acting was superb and the plot kept me guessing until the very end",
    "a dull script with wooden performances and far too many scenes",
    "beautiful photography but the story never finds its footing at all",
    "i laughed from start to finish and would happily watch it again",
    "the sound mix drowned out every line of dialogue in the theatre",
    "a tender family drama carried by two remarkable lead performances",
]
LONG = REVIEWS[0] + " and " + REVIEWS[3]


def test_duplicates_exact_and_near():
    examples = [
        _conv(REVIEWS[0], "positive", 1),
        _conv(REVIEWS[1], "negative", 2),
        _conv("  THE acting was superb and the plot kept me guessing until the very end ", "positive", 3),
        _conv(REVIEWS[2], "negative", 4),
        _conv(LONG, "positive", 5),
        _conv(LONG + " truly", "positive", 6),  # one word added to a long review: near duplicate
    ]
    rep = duplicates(examples)
    assert rep.exact_groups == [[1, 3]] and rep.n_exact == 1
    near_lines = {(a, b) for a, b, _ in rep.near_pairs}
    assert near_lines == {(5, 6)}
    assert all(s >= 0.8 for *_, s in rep.near_pairs)


def test_leakage_exact_near_and_clean():
    train = [_conv(r, "x", i + 1) for i, r in enumerate(REVIEWS[:4])]
    test = [
        _conv(REVIEWS[1], "different answer", 1),  # same prompt: leakage even with another reply
        _conv(REVIEWS[3].replace("again", "again soon"), "y", 2),
        _conv(REVIEWS[4], "z", 3),
    ]
    rep = leakage(train, test)
    assert rep.exact == [(1, 2)]
    assert [(o, t) for o, t, _ in rep.near] == [(2, 4)]
    assert rep.count == 2 and rep.fraction == pytest.approx(2 / 3)
    assert "2 of 3 examples" in rep.message("test.jsonl")
    assert leakage(train, [test[2]]).message() is None


def test_data_stats_cli_writes_histogram_and_flags_leakage(tmp_path):
    rows = [_chat(r, "positive" if i % 2 else "negative") for i, r in enumerate(REVIEWS)]
    rows += [rows[0], rows[1]]  # 2 exact repeats
    train = _write(tmp_path / "train.jsonl", rows)
    test = _write(tmp_path / "test.jsonl", [rows[2], _chat("an unrelated question about trains", "negative")])
    out = tmp_path / "stats"
    res = CliRunner().invoke(_app(), ["data", "stats", str(train), "--test", str(test), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "Leakage: 1 of 2 examples" in res.output and "2 exact repeats" in res.output
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "Length histogram" in (out / "lengths.txt").read_text()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["labels"] == {"negative": 4, "positive": 4}
    assert stats["examples"] == 8 and stats["test"]["leakage"]["exact"] == [[1, 3]]
    assert sum(c for *_, c in stats["histogram"]) == 8


def test_data_stats_counts_tokens_with_the_tokenizer(tmp_path, tiny_llama):
    from tunery.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    train = _write(tmp_path / "t.jsonl", [_chat(r, "ok") for r in REVIEWS])
    stats = data_stats(train, tokenizer=tok)
    assert stats["length_unit"] == "tokens"
    first = len(tok(f"user: {REVIEWS[0]}\nassistant: ok", add_special_tokens=False)["input_ids"])
    assert stats["lengths"]["min"] <= first <= stats["lengths"]["max"]


def test_synth_filters_parse_length_label_and_duplicates():
    assert parse_pair('Sure! {"input": "2+2", "output": "4"} done') == {"input": "2+2", "output": "4"}
    assert parse_pair("Input: hello there\nOutput: greeting") == {
        "input": "hello there",
        "output": "greeting",
    }
    assert parse_pair("no structure at all") is None
    assert parse_score("I'd give it 7/10.") == 7 and parse_score("none") is None
    s = SynthSettings(task="sentiment", labels=["positive", "negative"], max_chars=200)
    f = _Filter(s, [{"input": REVIEWS[0], "output": "positive"}])
    assert f.reason({"input": REVIEWS[1], "output": "Negative."}) is None  # label canonicalised
    assert f.reason({"input": REVIEWS[1], "output": "meh"}) == "invalid_label"
    assert f.reason({"input": REVIEWS[0].upper(), "output": "positive"}) == "exact_duplicate"
    assert f.reason({"input": REVIEWS[0] + " indeed", "output": "positive"}) == "near_duplicate"
    assert f.reason({"input": "x" * 300, "output": "positive"}) == "too_long"
    assert f.reason({"input": "", "output": "positive"}) == "too_short"


class ScriptedTeacher:
    """A deterministic teacher: replies from a script, in order, and remembers each prompt."""

    description = {"type": "scripted"}

    def __init__(self, replies: list[str]):
        self.replies, self.prompts = list(replies), []

    def complete(self, prompts, temperature, max_tokens):
        self.prompts += prompts
        return [self.replies.pop(0) for _ in prompts]


def test_synth_generate_mode_keeps_exactly_the_valid_new_examples():
    from tunery.data.synth import synthesize

    seeds = [{"input": REVIEWS[0], "output": "positive"}, {"input": REVIEWS[1], "output": "negative"}]
    teacher = ScriptedTeacher(
        [
            json.dumps({"input": REVIEWS[2], "output": "Negative."}),  # kept, label canonicalised
            "I cannot help with that.",  # unparseable
            json.dumps({"input": REVIEWS[0].upper(), "output": "positive"}),  # a seed again
            f"Input: {REVIEWS[3]}\nOutput: positive",  # kept (line format)
            json.dumps({"input": REVIEWS[4], "output": "meh"}),  # not a label
            json.dumps({"input": REVIEWS[3] + " today", "output": "positive"}),  # near a kept row
            json.dumps({"input": REVIEWS[5], "output": "positive"}),  # judged too low below
        ]
    )
    judge = ScriptedTeacher(["Score: 9", "8/10", "2"])  # asked only for candidates that passed
    settings = SynthSettings(
        task="Classify the sentiment.",
        n=3,
        labels=["positive", "negative"],
        min_judge_score=5,
        max_requests=7,
        near_threshold=0.75,
    )
    res = synthesize(teacher, settings, seeds, judge=judge)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in res.rows] == [
        (REVIEWS[2], "negative"),
        (REVIEWS[3], "positive"),
    ]
    assert [r["provenance"]["judge_score"] for r in res.rows] == [9.0, 8.0]
    assert all(r["provenance"]["mode"] == "generate" for r in res.rows)
    assert res.stats == {
        "requested": 7,
        "kept": 2,
        "unparseable": 1,
        "exact_duplicate": 1,
        "invalid_label": 1,
        "near_duplicate": 1,
        "judge_score": 1,
    }
    assert [r["reason"] for r in res.rejected] == [
        "unparseable",
        "exact_duplicate",
        "invalid_label",
        "near_duplicate",
        "judge_score",
    ]
    # each generation prompt shows both seeds (seeds_per_prompt 3 > 2), and the judge sees the pair
    assert len(teacher.prompts) == 7 and all(REVIEWS[0] in p[1]["content"] for p in teacher.prompts)
    assert REVIEWS[5] in judge.prompts[2][1]["content"] and not judge.replies


def test_synth_with_local_tiny_teacher(tmp_path, tiny_llama):
    from tunery.data import load_dataset
    from tunery.data.synth import label_prompt, read_seeds, synthesize, write_jsonl
    from tunery.generation.teacher import LocalTeacher

    seeds = read_seeds(_write(tmp_path / "seeds.jsonl", [_chat(REVIEWS[0], "positive")]))
    teacher = LocalTeacher(str(tiny_llama))
    # Label mode: the teacher answers given inputs; a random model's replies are kept (no label set).
    settings = SynthSettings(task="Rate the review.", n=3, max_tokens=6)
    res = synthesize(teacher, settings, seeds, REVIEWS[1:4])
    # The same model with the same sampling seed is deterministic: its replies are the expected rows.
    twin = LocalTeacher(str(tiny_llama))
    prompts = [label_prompt(settings.task, seeds, text) for text in REVIEWS[1:4]]
    replies = [r.strip() for r in twin.complete(prompts, settings.temperature, settings.max_tokens)]
    assert all(replies), replies  # non-empty, so every one passes the filters
    assert res.stats == {"requested": 3, "kept": 3}
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in res.rows] == list(
        zip(REVIEWS[1:4], replies, strict=True)
    )
    for row in res.rows:
        assert row["provenance"]["teacher"] == {"type": "local", "model": str(tiny_llama), "adapter": None}
        assert row["provenance"]["mode"] == "label" and row["provenance"]["seed_inputs"] == [REVIEWS[0]]
    path = write_jsonl(res.rows, tmp_path / "out.jsonl")
    assert len(load_dataset(path, kind="chat")) == 3  # trainable as written
    # Generate mode: random text is not a JSON pair, so every candidate is rejected and accounted for.
    gen = synthesize(teacher, SynthSettings(task="Rate.", n=2, max_tokens=8, max_requests=3), seeds)
    assert gen.stats == {"requested": 3, "kept": 0, "unparseable": 3}
    assert [r["reason"] for r in gen.rejected] == ["unparseable"] * 3


SERVED_LABELS = {REVIEWS[2]: "Negative.", REVIEWS[3]: "positive", REVIEWS[4]: "meh", REVIEWS[5]: "positive"}


def _served_teacher(messages: list[dict]) -> str:
    """The stub teacher: a fixed label per review; as judge, 3/10 for REVIEWS[5] and 8 for the rest."""
    if messages[0]["content"].startswith("You grade"):
        return "3" if REVIEWS[5] in messages[-1]["content"] else "Score: 8"
    return SERVED_LABELS[messages[-1]["content"]]


def test_synth_cli_with_served_teacher(tmp_path, chat_stub):
    server = chat_stub(_served_teacher)
    seeds = _write(tmp_path / "seeds.jsonl", [_chat(REVIEWS[0], "positive"), _chat(REVIEWS[1], "negative")])
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(REVIEWS[2:6]) + "\n")
    out = tmp_path / "synth.jsonl"
    args = [
        "data",
        "synth",
        "--seeds",
        str(seeds),
        "--inputs",
        str(inputs),
        "--output",
        str(out),
        "--task",
        "Classify the sentiment.",
        "--teacher-url",
        server.base_url,
        "--teacher-model",
        "teacher",
        "--api-key",
        "k",
        "--labels",
        "positive,negative",
        "--min-judge-score",
        "5",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--rejected",
        str(tmp_path / "rej.jsonl"),
    ]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert "Kept 2 of 4 candidates" in res.output
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == [
        (REVIEWS[2], "negative"),
        (REVIEWS[3], "positive"),
    ]
    assert [(r["reason"], r["text"]) for r in rejected] == [
        ("invalid_label", "meh"),
        ("judge_score", "positive"),
    ]
    for row in rows:
        assert row["provenance"]["teacher"] == {
            "type": "openai",
            "base_url": server.base_url,
            "model": "teacher",
        }
        assert row["provenance"]["judge_score"] == 8.0 and sorted(row["provenance"]["seed_inputs"]) == sorted(
            REVIEWS[:2]
        )
    # label prompts: the task as system message, both seeds as shots (in the order the row records),
    # then the input
    first, shots = server.requests[0], rows[0]["provenance"]["seed_inputs"]
    answer = {REVIEWS[0]: "positive", REVIEWS[1]: "negative"}
    assert first[0] == {"role": "system", "content": "Classify the sentiment."}
    assert [m["content"] for m in first[1:]] == [
        *shots[:1],
        answer[shots[0]],
        *shots[1:],
        answer[shots[1]],
        REVIEWS[2],
    ]


def test_missing_tracker_package_fails_the_run_cleanly(tmp_path, monkeypatch):
    import importlib.util

    from tunery.errors import ConfigError
    from tunery.plugins import load_config
    from tunery.train import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    cfg = load_config(sets=[f"output={tmp_path / 'run'}", "data.train=x.jsonl", "report_to=[mlflow]"])
    with pytest.raises(ConfigError, match="mlflow"):
        run(cfg)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["error"]["param"] == "report_to"


def test_sweep_data_scaling_and_grid(tmp_path, tiny_llama):
    import yaml

    from tests.helpers.tiny import write_chat_jsonl
    from tunery.workflows.sweep import load_spec, run_sweep

    train = write_chat_jsonl(tmp_path / "train.jsonl", n=20)
    test = write_chat_jsonl(tmp_path / "test.jsonl", n=4, seed=1)
    base = {
        "model": str(tiny_llama),
        "data": {"train": str(train)},
        "method": "lora",
        "hyperparameters": {"n_epochs": 1, "batch_size": 5, "max_steps": 1, "precision": "fp32"},
    }
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "eval_data": str(test),
                "metric": "loss",
                "output": str(tmp_path / "sw"),
                "data_fractions": [0.5, 1.0],
                "grid": {"hyperparameters.learning_rate": [0.001, 0.01]},
                "max_eval": 2,
            }
        )
    )
    result = run_sweep(load_spec(spec_path))
    rows = result["rows"]
    assert [(r["n_train"], r["hyperparameters.learning_rate"]) for r in rows] == [
        (10, 0.001),
        (20, 0.001),
        (10, 0.01),
        (20, 0.01),
    ]
    assert all(r["status"] == "succeeded" and r["loss"] > 0 for r in rows)
    # Every trial really trained with its own settings and data subset.
    cfg = yaml.safe_load((tmp_path / "sw" / "trial-002" / "run" / "config.yaml").read_text())
    assert cfg["hyperparameters"]["learning_rate"] == 0.01 and cfg["data"]["train"].endswith("train.jsonl")
    assert len((tmp_path / "sw" / "trial-002" / "train.jsonl").read_text().splitlines()) == 10
    best = min(rows, key=lambda r: r["loss"])
    assert result["best"] is best and "**best**" in (tmp_path / "sw" / "sweep.md").read_text()
    best_cfg = yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())
    assert best_cfg["hyperparameters"]["learning_rate"] == best["hyperparameters.learning_rate"]
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "sw" / "sweep.csv").read_text().splitlines()) == 5


def test_recommend_choices_and_memory_parsing(tmp_path, tiny_llama, monkeypatch):
    from tests.helpers.tiny import write_chat_jsonl
    from tunery.models.cpu_bf16 import CPU_BF16_ENV
    from tunery.workflows.recommend import GB, parse_memory, recommend

    assert parse_memory("8GB") == 8 * GB and parse_memory("512 MB") == 512 * 1024**2
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=30)
    # Whether this CPU computes bf16 faster is measured (tests/test_train.py); here it is set, both ways.
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    rec = recommend(str(tiny_llama), str(data), 8 * GB, device="cpu", gflops=10.0)
    c = rec.chosen
    assert c is not None and c.method == "lora" and c.fits and c.batch_size == 1
    assert c.max_length == 64 and c.max_length >= rec.data["p99"]
    assert c.peak_bytes == sum(c.parts.values()) and c.epoch_seconds > 0
    assert any("fp32" in a or "bf16" in a for a in rec.to_dict()["assumptions"])
    assert c.precision == "fp32" and any(r.startswith("precision fp32:") for r in rec.reasons)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    half = recommend(str(tiny_llama), str(data), 8 * GB, device="cpu", gflops=10.0)
    h = half.chosen
    assert (
        h is not None and h.precision == "bf16" and any(r.startswith("precision bf16:") for r in half.reasons)
    )
    assert (h.method, h.max_length) == (c.method, c.max_length)
    assert h.parts["activations"] * 2 == c.parts["activations"]  # 2 bytes a value instead of 4
    assert recommend(str(tiny_llama), str(data), 100 * 1024**2, device="cpu", gflops=10.0).chosen is None
    res = CliRunner().invoke(
        _app(),
        ["recommend", "--model", str(tiny_llama), "--data", str(data), "--memory", "4GB", "--device", "cpu"],
    )
    assert res.exit_code == 0 and "Estimated peak memory" in res.output and "Assumptions" in res.output


MEASURE = """
import json, re, sys
import torch, transformers, peft, accelerate  # the runtime the estimate counts separately
import tunery.train.setup
from tunery.plugins import load_config
from tunery.train import run

def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

# Reset the peak (VmHWM) after the imports: an import-time spike must not hide the training peak.
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
run(load_config(sets=json.loads(sys.argv[1])))
print(json.dumps({"baseline": base, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow  # heavy for the developer loop: a training run measured against the estimate
def test_memory_estimate_matches_measured_peak(tmp_path):
    """Full fine-tuning of a 3.6M-parameter model in a fresh process: the estimate of the training
    memory (everything but the runtime) is within 25% of the measured peak RSS growth."""
    import subprocess
    import sys

    from tests.helpers.tiny import make_tiny_model_dir, write_chat_jsonl
    from tunery.models.load import load_tokenizer
    from tunery.workflows.recommend import data_facts, estimate, model_facts

    model = make_tiny_model_dir(
        tmp_path / "m", "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4
    )
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=12)
    sets = [
        f"model={model}",
        f"data.train={data}",
        f"output={tmp_path / 'run'}",
        "method=full",
        "hyperparameters.n_epochs=1",
        "hyperparameters.batch_size=4",
        "hyperparameters.precision=fp32",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(sets)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    m = model_facts(str(model))
    est = estimate(
        m,
        data_facts(str(data), load_tokenizer(str(model))),
        method="full",
        precision="fp32",
        max_length=1024,
        batch_size=4,
    )
    predicted = est.peak_bytes - est.parts["runtime"]
    grown = measured["peak"] - measured["baseline"]
    assert abs(predicted / grown - 1) < 0.25, (predicted, grown, est.parts)
