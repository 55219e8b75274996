"""The classify objective: a head on tiny BERT and Llama learns a separable toy task, saves and loads
with identical probabilities, weights the loss as documented, and refuses unknown labels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import quick_run_config, write_jsonl
from tunery.errors import DataError
from tunery.plugins import load_config
from tunery.train import run

POS = ["wonderful", "I loved this movie", "great story", "the acting was wonderful", "great"]
NEG = ["terrible", "it broke", "support never answered", "terrible product", "broke after two days"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"), "bert")


def toy(path: Path, n: int, offset: int = 0) -> Path:
    rows = []
    for i in range(offset, offset + n):
        good = i % 2 == 0
        words = POS if good else NEG
        rows.append({"text": f"{words[i % 5]} {i % 7}", "label": "positive" if good else "negative"})
    return write_jsonl(path, rows)


def config(tmp_path: Path, model: Path, data: Path, method: str, **sets):
    defaults = {
        "hyperparameters.max_length": 32,
        "hyperparameters.n_epochs": 6,
        "hyperparameters.batch_size": 8,
    }
    return quick_run_config(
        model, data, tmp_path / f"run-{method}", objective="classify", method=method, **{**defaults, **sets}
    )


@pytest.mark.parametrize(
    ("arch", "method", "lr"),
    [("bert", "full", 1e-3), ("llama", "lora", 5e-3), ("llama", "freeze", 2e-3), ("bert", "lora", 5e-3)],
)
def test_head_learns_toy_task_and_reloads(tmp_path, tiny_bert, tiny_llama, arch, method, lr):
    from tunery.evaluate.classify import evaluate_classifier, load_classifier, predict_proba

    model = tiny_bert if arch == "bert" else tiny_llama
    train = toy(tmp_path / "train.jsonl", 32)
    valid = toy(tmp_path / "valid.jsonl", 20, offset=100)
    cfg = config(
        tmp_path,
        model,
        train,
        method,
        **{"data.validation": str(valid), "hyperparameters.learning_rate": lr},
    )
    result = run(cfg)
    info = json.loads((result.model_dir / "tunery.json").read_text())
    assert info["labels"] == ["negative", "positive"] and info["objective"] == "classify"
    if method == "lora":  # the head trained in full and saved with the adapter
        saved = json.loads((result.model_dir / "adapter_config.json").read_text())
        assert ("score" if arch == "llama" else "classifier") in saved["modules_to_save"]
    clf, tok, meta = load_classifier(None, result.model_dir)
    res = evaluate_classifier(clf, tok, valid, meta["labels"])
    assert res["accuracy"] > 0.95, res
    assert 0 <= res["calibration"]["ece"] <= 1 and res["log_loss"] > 0
    assert sum(b["count"] for b in res["calibration"]["bins"]) == 20
    # loading again reproduces the probabilities exactly
    texts = ["wonderful 3", "terrible 5"]
    first = predict_proba(clf, tok, texts)
    again, tok2, _ = load_classifier(None, result.model_dir)
    assert torch.allclose(torch.tensor(first), torch.tensor(predict_proba(again, tok2, texts)), atol=1e-6)


def test_class_weights_follow_the_formula():
    from tunery.objectives.classify import classification_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor([0.5, 2.0, 3.0])
    plain, _ = classification_loss(logits, y, None, False, 0.5)
    weighted, correct = classification_loss(logits, y, w, False, 0.5)
    nll = -torch.log_softmax(logits, -1)[torch.arange(6), y]
    assert torch.allclose(plain, nll) and torch.allclose(weighted, w[y] * nll)
    assert torch.equal(correct, logits.argmax(-1) == y)
    # multi-label: mean over labels of w_c * BCE
    target = torch.tensor([[1.0, 0.0, 1.0]] * 6)
    multi, _ = classification_loss(logits, target, w, True, 0.5)
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    assert torch.allclose(multi, (w * bce).mean(-1), atol=1e-5)


def test_balanced_weights_and_unknown_validation_label(tmp_path, tiny_bert):
    from tunery.objectives.classify import class_weight_vector, label_set

    rows = [{"text": f"a {i}", "label": "x" if i < 9 else "y"} for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config(tmp_path, tiny_bert, train, "full", **{"classify.class_weights": "balanced"})
    labels = label_set(cfg)
    assert labels == ["x", "y"]
    assert class_weight_vector(cfg, labels) == pytest.approx([12 / (2 * 9), 12 / (2 * 3)])
    valid = write_jsonl(
        tmp_path / "valid.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "zzz"}]
    )
    cfg = config(tmp_path, tiny_bert, train, "full", **{"data.validation": str(valid)})
    with pytest.raises(DataError) as err:
        run(cfg)
    assert "valid.jsonl" in str(err.value) and "line 2" in str(err.value) and "zzz" in str(err.value)


def test_chat_labels_convert_and_cli_writes_probabilities(tmp_path, tiny_bert):
    import typer
    from typer.testing import CliRunner

    from tunery.data import load_dataset
    from tunery.evaluate.classify_cli import register

    chat = [
        {
            "messages": [
                {"role": "system", "content": "Classify."},
                {"role": "user", "content": w},
                {"role": "assistant", "content": "positive" if i % 2 == 0 else "negative"},
            ]
        }
        for i, w in enumerate(["wonderful", "terrible", "great", "it broke"] * 4)
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", chat)
    ex = load_dataset(train, kind="labeled").examples[1]
    assert (ex.text, ex.labels) == ("terrible", ["negative"])
    result = run(config(tmp_path, tiny_bert, train, "full", **{"hyperparameters.n_epochs": 1}))
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "labels.jsonl"
    res = CliRunner().invoke(
        app, ["classify", "--adapter", str(result.model_dir), "--input", str(train), "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["label"] in {"positive", "negative"}
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    # `tunery eval` on the head model: classification metrics plus log loss and calibration
    from tunery.evaluate.cli import register as register_eval

    register_eval(app)
    res = CliRunner().invoke(
        app,
        ["eval", "--adapter", str(result.model_dir), "--data", str(train), "--output", str(tmp_path / "ev")],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"accuracy", "macro_f1", "confusion_matrix", "log_loss", "calibration"} <= set(report)

    # the server's /v1/classifications on the same (local, full fine-tuned) model dir
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app
    from tunery.serve.common import Settings

    app_ = create_app(Settings(data_dir=tmp_path / "srv", no_auth=True, run_executor=False))
    with TestClient(app_, base_url="http://127.0.0.1") as client:  # --no-auth: loopback Host only
        body = {"model": str(result.model_dir.resolve()), "input": ["wonderful", "terrible"]}
        got = client.post("/v1/classifications", json=body).json()
        assert got["object"] == "list" and [d["index"] for d in got["data"]] == [0, 1]
        assert got["data"][0]["probabilities"] == pytest.approx(rows[0]["probabilities"], abs=1e-5)
        assert (
            client.post("/v1/classifications", json={"model": body["model"], "input": 3}).status_code == 400
        )


@pytest.mark.slow
def test_minilm_sentiment_head_reaches_90_percent(tmp_path):
    from tunery.evaluate.classify import evaluate_classifier, load_classifier
    from tunery.resources import dataset_file

    t = time.perf_counter()
    cfg = load_config(
        sets=[
            "model=minilm-l6",
            f"data.train={dataset_file('sentiment', 'train')}",
            "objective=classify",
            "method=full",
            "hyperparameters.n_epochs=4",
            "hyperparameters.batch_size=16",
            "hyperparameters.learning_rate=2e-4",
            "hyperparameters.max_length=128",
            f"output={tmp_path / 'run'}",
        ]
    )
    result = run(cfg)
    clf, tok, info = load_classifier(None, result.model_dir)
    res = evaluate_classifier(clf, tok, dataset_file("sentiment", "test"), info["labels"])
    print(f"minilm-l6 head: accuracy {res['accuracy']:.3f} in {time.perf_counter() - t:.1f}s")
    assert res["accuracy"] >= 0.9
