"""Old model against new on the held-out slice of the logs (issue 27, section 4): the references of
each from-logs shape, the scores (exact match, classification metrics, chrF), latency and prompt
tokens, through a scripted engine (exact numbers) and through the real engine on the tiny model
(`tunery logs compare` and `POST /v1/tunery/compare`, with per-key isolation)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tests.helpers.server import make_lora_adapter, register_model
from tests.helpers.tiny import tiny_tokenizer
from tunery.cli import app
from tunery.data import from_logs
from tunery.evaluate.heldout import Contender, compare_on_heldout, load_heldout
from tunery.generation.generate import chat_prompt
from tunery.generation.sequence import GenerationResult
from tunery.jobs.store import Store
from tunery.serve.common import Settings


def _rec(i: int, prompt: str, reply: str, rating=None, corrected=None) -> dict:
    """A stored completion as `tunery logs export` writes it (what from-logs reads)."""
    feedback = None if rating is None else {"rating": rating, "corrected": corrected}
    return {
        "id": f"chatcmpl-{i}",
        "created_at": 1000 + i,
        "request": {"messages": [{"role": "user", "content": prompt}]},
        "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]},
        "feedback": feedback,
    }


RECORDS = [
    _rec(0, "train a", "x", "up"),
    _rec(1, "train b", "y", "down", corrected="z"),
    _rec(2, "refund please", "positive", "down", corrected="negative"),
    _rec(3, "great service", "positive", "up"),
    _rec(4, "broken again", "negative", "down"),
]


def _slice(tmp_path: Path, shape: str) -> Path:
    built = from_logs.build(RECORDS, shape, "rated", test_fraction=0.5)
    return from_logs.write(built, tmp_path / f"{shape}.jsonl")[1]


def test_references_are_the_reviewed_replies_in_every_shape(tmp_path):
    sft, _ = load_heldout(_slice(tmp_path, "sft"))
    # SFT keeps up-rated and corrected replies; the two newest are held out.
    assert [(e.prompt[-1]["content"], e.reference) for e in sft] == [
        ("refund please", "negative"),
        ("great service", "positive"),
    ]
    dpo, _ = load_heldout(_slice(tmp_path, "dpo"))
    assert [e.reference for e in dpo] == ["negative"]  # the correction, not the reply it corrects
    kto, skipped = load_heldout(_slice(tmp_path, "kto"))
    # KTO's three held-out rows: the correction and "great service" (desirable), and "broken again"
    # (undesirable: it has no reference).
    assert [e.reference for e in kto] == ["negative", "positive"] and skipped == 1


class ScriptedEngine:
    """The engine's interface, answering from a script: model -> {prompt text: reply}."""

    def __init__(self, script: dict[str, dict[str, str]]):
        self.script = script
        self.tok = tiny_tokenizer()

    def tokenizer(self, spec, adapter):
        return self.tok

    def submit(self, spec, adapter, ids, params):
        text = self.tok.decode(ids)
        reply = next(a for q, a in self.script[spec].items() if q in text)
        return SimpleNamespace(result=lambda: [GenerationResult([], reply, "stop", None, len(ids), 1)])


LABELLED = {"good food": "positive", "cold soup": "negative", "nice staff": "positive", "rude": "negative"}


def _examples(tmp_path: Path, pairs: dict[str, str]):
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs.items()
    ]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_heldout(path)[0]


def test_label_replies_get_classification_metrics_latency_and_tokens(tmp_path):
    examples = _examples(tmp_path, LABELLED)
    old = {"good food": "positive", "cold soup": "positive", "nice staff": "maybe", "rude": "negative"}
    engine = ScriptedEngine({"old": old, "new": dict(LABELLED)})
    result = compare_on_heldout(engine, [Contender("old", "old"), Contender("new", "new")], examples)
    assert result["task"] == "classification" and result["n"] == 4
    by = {r["label"]: r for r in result["models"]}
    assert by["old"]["exact_match"] == 0.5 and by["new"]["exact_match"] == 1.0
    assert by["old"]["accuracy"] == 0.5 and by["old"]["invalid"] == 1 and by["new"]["macro_f1"] == 1.0
    lengths = [len(chat_prompt(engine.tok, e.prompt)) for e in examples]
    assert by["new"]["prompt_tokens"]["mean"] == pytest.approx(sum(lengths) / 4)
    assert by["old"]["prompt_tokens"]["p95"] == max(lengths)
    assert all(r["latency_ms"]["p50"] >= 0 for r in result["models"])
    differ = {d["prompt"]: d["replies"] for d in result["disagreements"]}
    assert differ == {
        "cold soup": {"old": "positive", "new": "negative"},
        "nice staff": {"old": "maybe", "new": "positive"},
    }


def test_free_text_replies_get_chrf(tmp_path):
    pairs = {"greet": "Hello there, how can I help?", "bye": "Goodbye and thanks.", "ask": "Which order?"}
    examples = _examples(tmp_path, pairs)
    engine = ScriptedEngine({"a": {"greet": "Hello there!", "bye": "bye", "ask": "What?"}, "b": dict(pairs)})
    result = compare_on_heldout(engine, [Contender("a", "a"), Contender("b", "b")], examples)
    by = {r["label"]: r for r in result["models"]}
    assert result["task"] == "generation" and "accuracy" not in by["a"]
    assert by["b"]["chrf"] == pytest.approx(100) and 0 < by["a"]["chrf"] < 100


@pytest.fixture(scope="module")
def served_models(tmp_path_factory, tiny_llama):
    """A data dir with one key owning a fine-tuned model (a random LoRA on the tiny model)."""
    root = tmp_path_factory.mktemp("compare")
    store = Store(root / "data")
    alice = store.create_key("alice")[1]
    bob = store.create_key("bob")[1]
    alice_id = store.key_for(alice).id
    store.close()
    adapter = make_lora_adapter(tiny_llama, root / "lora", seed=1)
    register_model(root / "data", alice, "ft:tiny:alice::1", tiny_llama, adapter)
    heldout = root / "heldout.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in LABELLED.items()
    ]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "alice": alice, "alice_id": alice_id, "bob": bob, "heldout": heldout}


def test_cli_compares_a_base_with_an_ft_model(served_models, tiny_llama):
    env, out = served_models, served_models["root"] / "compare.json"
    args = ["logs", "compare", str(tiny_llama), "ft:tiny:alice::1", "--data", str(env["heldout"])]
    args += ["--max-new-tokens", "3", "--data-dir", str(env["root"] / "data"), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Held-out slice: 4 examples" in result.output and "ft:tiny:alice::1" in result.output
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["models"]] == [str(tiny_llama), "ft:tiny:alice::1"]
    assert data["n"] == 4 and all(r["prompt_tokens"]["mean"] > 0 for r in data["models"])
    # Naming the wrong key for the ft: model is a clear error, not a traceback.
    bad = CliRunner().invoke(app, [*args[:-2], "--key", "key_nobody"])
    assert bad.exit_code == 2 and "No fine-tuned model 'ft:tiny:alice::1'" in bad.output
    assert "Traceback" not in bad.output


def test_api_compare_is_per_key(served_models, tiny_llama):
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    env = served_models
    settings = Settings(data_dir=env["root"] / "data", run_executor=False, allow_local_models=True)
    with TestClient(create_app(settings)) as http:

        def as_(key):
            return {"Authorization": f"Bearer {key}"}

        upload = http.post(
            "/v1/files",
            headers=as_(env["alice"]),
            data={"purpose": "fine-tune"},
            files={"file": ("heldout.jsonl", env["heldout"].read_bytes())},
        )
        file_id = upload.json()["id"]
        body = {"file": file_id, "models": [str(tiny_llama), "ft:tiny:alice::1"], "max_new_tokens": 3}
        ok = http.post("/v1/tunery/compare", headers=as_(env["alice"]), json=body, timeout=300)
        assert ok.status_code == 200, ok.text
        assert [r["label"] for r in ok.json()["models"]] == body["models"]
        # Bob can neither read Alice's test file nor run her model.
        theirs = http.post("/v1/tunery/compare", headers=as_(env["bob"]), json=body)
        assert theirs.status_code == 404 and file_id in theirs.json()["error"]["message"]
        bob_file = http.post(
            "/v1/files",
            headers=as_(env["bob"]),
            data={"purpose": "fine-tune"},
            files={"file": ("mine.jsonl", env["heldout"].read_bytes())},
        ).json()["id"]
        her_model = http.post("/v1/tunery/compare", headers=as_(env["bob"]), json={**body, "file": bob_file})
        assert her_model.status_code == 404 and her_model.json()["error"]["code"] == "model_not_found"
        same = http.post("/v1/tunery/compare", headers=as_(env["alice"]), json={**body, "models": ["a", "a"]})
        assert same.status_code == 400 and same.json()["error"]["param"] == "models"


def test_api_compare_error_names_the_upload_not_the_server_path(served_models, tiny_llama):
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    env = served_models
    settings = Settings(data_dir=env["root"] / "data", run_executor=False, allow_local_models=True)
    # Only an undesirable KTO row: nothing to compare against.
    undesirable = {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "no"}],
        "label": False,
    }
    with TestClient(create_app(settings)) as http:
        auth = {"Authorization": f"Bearer {env['alice']}"}
        file_id = http.post(
            "/v1/files",
            headers=auth,
            data={"purpose": "fine-tune"},
            files={"file": ("bad.jsonl", (json.dumps(undesirable) + "\n").encode())},
        ).json()["id"]
        body = {"file": file_id, "models": [str(tiny_llama), "ft:tiny:alice::1"]}
        r = http.post("/v1/tunery/compare", headers=auth, json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "bad.jsonl" in message and str(env["root"]) not in message
