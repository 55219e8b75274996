"""Comparing old and new models on the held-out slice (issue 27, sections 4 and 5): scores per task
when the rows name their task (or come from one file per task, as `data.train` lists them), a
fixed-seed sample, and the progress of a running `POST /v1/tunery/compare`, which never holds up the
server's other requests. A scripted engine gives exact numbers; the CLI runs the real one."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tests.helpers.tiny import tiny_tokenizer
from tunery.cli import app
from tunery.evaluate.heldout import Contender, compare_on_heldout, load_heldout, sample
from tunery.generation.sequence import GenerationResult
from tunery.jobs.store import Store
from tunery.serve.common import Settings


class Engine:
    """The engine interface, answering from a script (model -> {prompt text: reply}); with `gate`,
    each reply waits until the gate opens."""

    def __init__(self, script, gate: threading.Event | None = None):
        self.script, self.gate, self.tok = script, gate, tiny_tokenizer()

    def tokenizer(self, spec, adapter):
        return self.tok

    def engine_name(self, spec, adapter, cheap=False):  # for GET /v1/models
        return "torch", None

    def close(self):  # the app closes its engine on shutdown
        if self.gate is not None:
            self.gate.set()

    def submit(self, spec, adapter, ids, params):
        text = self.tok.decode(ids)
        reply = next(a for q, a in self.script[spec].items() if q in text)

        def result():
            if self.gate is not None:
                assert self.gate.wait(60), "the test never opened the gate"
            return [GenerationResult([], reply, "stop", None, len(ids), 1)]

        return SimpleNamespace(result=result)


def _chat(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SENTIMENT = {"good food": "positive", "cold soup": "negative", "nice staff": "positive", "rude": "negative"}
GREET = {
    "greet": "Hello there, how can I help?",
    "bye": "Goodbye and thanks.",
    "ask": "Which order do you mean?",
}
OLD = {"good food": "positive", "cold soup": "positive", "nice staff": "positive", "rude": "negative"}
OLD |= {"greet": "Hello there, how can I help?", "bye": "bye", "ask": "Which order do you mean?"}
NEW = {**SENTIMENT, "greet": "What?", "bye": "Goodbye and thanks.", "ask": "What?"}


def test_rows_that_name_their_task_are_scored_per_task(tmp_path):
    rows = [_chat(q, a, task="sentiment") for q, a in SENTIMENT.items()]
    rows += [_chat(q, a, task="greeting") for q, a in GREET.items()]
    examples, _ = load_heldout(_write(tmp_path / "mix.test.jsonl", rows))
    engine = Engine({"old": OLD, "new": NEW})
    result = compare_on_heldout(engine, [Contender("old", "old"), Contender("new", "new")], examples)
    tasks = result["per_task"]
    assert list(tasks) == ["greeting", "sentiment"]
    senti, greet = tasks["sentiment"], tasks["greeting"]
    assert (senti["n"], senti["task"], greet["n"], greet["task"]) == (4, "classification", 3, "generation")
    by = {r["label"]: r for r in senti["models"]}
    assert (by["old"]["exact_match"], by["old"]["accuracy"], by["new"]["accuracy"]) == (0.75, 0.75, 1.0)
    assert "per_class" not in by["old"] and "chrf" not in by["old"]
    g = {r["label"]: r for r in greet["models"]}
    assert (g["old"]["exact_match"], g["new"]["exact_match"]) == pytest.approx((2 / 3, 1 / 3))
    assert 0 < g["new"]["chrf"] < 100 and "accuracy" not in g["new"]
    # Over all seven rows the references are no label set: the whole slice is scored as generation.
    assert result["task"] == "generation" and result["n"] == 7
    # Without task names there is no per-task block.
    plain, _ = load_heldout(_write(tmp_path / "plain.jsonl", [_chat(q, a) for q, a in SENTIMENT.items()]))
    assert "per_task" not in compare_on_heldout(engine, [Contender("new", "new")], plain)


def test_one_file_per_task_and_a_row_task_wins(tmp_path):
    senti = _write(tmp_path / "sentiment.test.jsonl", [_chat(q, a) for q, a in SENTIMENT.items()])
    greet_rows = [_chat("greet", GREET["greet"]), _chat("bye", GREET["bye"], task="farewell")]
    greet = _write(tmp_path / "greeting.test.jsonl", greet_rows)
    examples, skipped = load_heldout([senti, greet])
    assert [e.task for e in examples] == ["sentiment"] * 4 + ["greeting", "farewell"] and skipped == 0
    # A DPO row keeps its task too (read from the file's own line).
    dpo = {
        "input": {"messages": [{"role": "user", "content": "rude"}]},
        "preferred_output": [{"role": "assistant", "content": "negative"}],
        "non_preferred_output": [{"role": "assistant", "content": "positive"}],
        "task": "sentiment",
    }
    (got,), _ = load_heldout(_write(tmp_path / "dpo.jsonl", [dpo]))
    assert (got.reference, got.task) == ("negative", "sentiment")


def test_sample_is_fixed_and_progress_counts_every_reply(tmp_path):
    rows = [_chat(f"question {i:02d}", f"answer {i}") for i in range(10)]
    examples, _ = load_heldout(_write(tmp_path / "ten.jsonl", rows))
    picked = sample(examples, 3)
    assert picked == sample(examples, 3) and len(picked) == 3
    order = [examples.index(e) for e in picked]
    assert order == sorted(order)  # file order kept
    assert sample(examples, 10) == examples and sample(examples, None) == examples
    script = {f"question {i:02d}": f"answer {i}" for i in range(10)}
    seen = []
    engine = Engine({"a": script, "b": script})
    result = compare_on_heldout(
        engine,
        [Contender("a", "a"), Contender("b", "b")],
        picked,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    assert result["n"] == 3 and seen == [(i, 6) for i in range(1, 7)]


def test_cli_compares_several_task_files_on_a_sample(tmp_path, tiny_llama, tiny_qwen2):
    senti = _write(tmp_path / "sentiment.test.jsonl", [_chat(q, a) for q, a in SENTIMENT.items()])
    greet = _write(tmp_path / "greeting.test.jsonl", [_chat(q, a) for q, a in GREET.items()])
    out = tmp_path / "compare.json"
    args = ["logs", "compare", str(tiny_llama), str(tiny_qwen2), "--data", str(senti), "--data", str(greet)]
    args += [
        "--sample",
        "5",
        "--max-new-tokens",
        "2",
        "--output",
        str(out),
        "--data-dir",
        str(tmp_path / "d"),
    ]
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 0, got.output
    result = json.loads(out.read_text())
    assert (result["n"], result["sampled_from"]) == (5, 7)
    assert sum(t["n"] for t in result["per_task"].values()) == 5
    assert set(result["per_task"]) <= {"sentiment", "greeting"}
    assert "Per task" in got.output


# ---------------------------------------------------------------------------------------------
# POST /v1/tunery/compare: sample size, progress, and the server stays responsive


@pytest.fixture
def http(tmp_path):
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    store = Store(tmp_path / "data")
    key = store.create_key("alice")[1]
    store.close()
    settings = Settings(data_dir=tmp_path / "data", run_executor=False, allow_local_models=True)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def test_api_compare_samples_reports_progress_and_blocks_nothing(http, tmp_path, tiny_llama, tiny_qwen2):
    rows = [_chat(q, a, task="sentiment") for q, a in SENTIMENT.items()]
    upload = http.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("s.test.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())},
    )
    old, new = str(tiny_llama), str(tiny_qwen2)
    gate = threading.Event()
    http.app.state._engine = Engine({old: OLD, new: NEW}, gate)  # what get_engine hands out
    body = {"file": upload.json()["id"], "models": [old, new], "sample": 3, "max_new_tokens": 2}
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=http.post("/v1/tunery/compare", json=body)))
    assert http.get("/v1/tunery/compare/progress").json() == {
        "object": "tunery.compare.progress",
        "running": False,
        "done": 0,
        "total": None,
    }
    worker.start()
    deadline = time.time() + 30
    while not http.get("/v1/tunery/compare/progress").json()["running"]:
        assert time.time() < deadline, "the comparison never started"
        time.sleep(0.05)
    # While it waits on the engine, other requests are served, and a second comparison is refused.
    assert http.get("/v1/models").status_code == 200
    progress = http.get("/v1/tunery/compare/progress").json()
    assert progress["running"] and (progress["done"], progress["total"]) == (0, 6)
    again = http.post("/v1/tunery/compare", json=body)
    assert again.status_code == 429 and again.json()["error"]["code"] == "concurrent_requests_exceeded"
    gate.set()
    worker.join(60)
    got = answer["r"]
    assert got.status_code == 200, got.text
    result = got.json()
    assert (result["n"], result["sampled_from"], result["per_task"]["sentiment"]["n"]) == (3, 4, 3)
    assert http.get("/v1/tunery/compare/progress").json()["running"] is False
    bad = http.post("/v1/tunery/compare", json={**body, "sample": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sample"
