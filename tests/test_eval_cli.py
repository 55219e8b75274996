"""`tunery eval`, `compare` and `generate` through the real typer commands on a tiny model."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from tests.helpers.tiny import chat_row, write_jsonl
from tunery.evaluate.cli import register

LABELS = ["positive", "negative", "mixed"]


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def _write_chat(path, n):
    return write_jsonl(path, [chat_row(f"review {i}", LABELS[i % 3], system="Classify.") for i in range(n)])


def test_eval_cli_writes_eval_json(app, tiny_llama, tmp_path):
    data = _write_chat(tmp_path / "test.jsonl", 6)
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_llama),
            "--data",
            str(data),
            "--output",
            str(out),
            "--batch-size",
            "3",
            "--max-new-tokens",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "eval.json").read_text())
    for key in (
        "accuracy",
        "exact_match",
        "n",
        "invalid",
        "per_class",
        "confusion_matrix",
        "labels",
        "macro_f1",
        "weighted_f1",
        "loss",
        "perplexity",
        "examples",
    ):
        assert key in report, key
    assert report["n"] == 6 and sorted(report["per_class"]) == sorted(LABELS)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
    assert "Confusion matrix" in res.output and "accuracy" in res.output


def test_eval_cli_user_errors_are_clean(app, tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\nnot json\n'
    )
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--data", str(bad)])
    assert res.exit_code == 2 and "line 2" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_compare_cli(app, tiny_llama, tmp_path):
    test = _write_chat(tmp_path / "test.jsonl", 4)
    train = _write_chat(tmp_path / "train.jsonl", 9)
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_llama),
            "--data",
            str(test),
            "--train",
            str(train),
            "--shots",
            "3",
            "--max-new-tokens",
            "3",
            "--output",
            str(tmp_path / "cmp"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"].split()[-1] for r in report["rows"]] == ["zero-shot", "3-shot"]


def test_generate_cli(app, tiny_llama, tmp_path):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hello"}]})
        + "\n"
        + json.dumps({"prompt": "The quick brown"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_llama),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--max-new-tokens",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["usage"]["completion_tokens"] <= 5 and "completion" in r for r in rows)
    assert rows[1]["prompt"] == "The quick brown"
