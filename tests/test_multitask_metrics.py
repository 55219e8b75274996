"""Validation metrics in the run's files: `compute_classification_metrics` as OpenAI's
`classification/...` columns of results.csv, and multi-task validation reported per task."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import chat_row, quick_run_config, write_chat_jsonl, write_jsonl
from tunery.train import run
from tunery.train.events import RESULT_COLUMNS, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "Answer yes or no."


def _yes_no(path: Path, colours: list[tuple[str, str]], task: str | None = None) -> Path:
    """Rows asking whether a colour is red, with the given answers."""
    rows = []
    for i, (colour, answer) in enumerate(colours):
        row = chat_row(f"Item {i} is {colour}. Is it red?", answer, system=SYSTEM)
        rows.append({**row, "task": task} if task else row)
    return write_jsonl(path, rows)


TRAIN_YES_NO = [("red", "yes"), ("blue", "no")] * 8
# green was never seen: whatever the model answers for both, one of them is wrong
VALID_YES_NO = [
    ("red", "yes"),
    ("blue", "no"),
    ("red", "yes"),
    ("green", "yes"),
    ("blue", "no"),
    ("green", "no"),
    ("red", "yes"),  # supports of 4 and 3: weighted F1 is not the macro F1
]


def _results(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def _greedy(model, tok, messages: list[dict], max_new: int) -> str:
    """The reply, one argmax token at a time until the end-of-turn token."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt_len = len(ids)
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return tok.decode(ids[prompt_len:], skip_special_tokens=True)


def _binary_by_hand(preds: list[str], refs: list[str], positive: str, betas: list[float]) -> dict[str, float]:
    """Accuracy, weighted F1 and the positive class's precision, recall and F-betas; a reply that is
    no label is wrong (and predicts no class)."""
    preds = [p.strip().lower().rstrip(".") for p in preds]
    n = len(refs)
    f1 = {}
    for c in set(refs):
        tp = sum(p == r == c for p, r in zip(preds, refs, strict=True))
        pred_c, true_c = preds.count(c), refs.count(c)
        prec, rec = (tp / pred_c if pred_c else 0.0), (tp / true_c if true_c else 0.0)
        f1[c] = (prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    prec, rec, _ = f1[positive]

    def f_beta(b):
        return (1 + b * b) * prec * rec / (b * b * prec + rec) if prec + rec else 0.0

    out = {
        "classification/accuracy": sum(p == r for p, r in zip(preds, refs, strict=True)) / n,
        "classification/weighted_f1_score": sum(f1[c][2] * refs.count(c) for c in f1) / n,
        "classification/precision": prec,
        "classification/recall": rec,
    }
    out.update({f"classification/f{float(b)}": f_beta(b) for b in sorted({1.0, *betas})})
    return out


def test_classification_metrics_are_openai_columns_of_results_csv(tmp_path, tiny_llama):
    train = _yes_no(tmp_path / "train.jsonl", TRAIN_YES_NO)
    valid = _yes_no(tmp_path / "valid.jsonl", VALID_YES_NO)
    cfg = quick_run_config(
        tiny_llama,
        train,
        tmp_path / "run",
        method="full",
        **{
            "data.validation": str(valid),
            "compute_classification_metrics": "true",
            "classification_positive_class": "'yes'",
            "classification_betas": "[0.5, 2]",
            "hyperparameters.n_epochs": 10,
            "hyperparameters.batch_size": 4,
            "hyperparameters.learning_rate": 0.01,
            "hyperparameters.logging_steps": 1,
        },
    )
    result = run(cfg)
    header, rows = _results(result.output_dir)
    extra = [
        "classification/accuracy",
        "classification/weighted_f1_score",
        "classification/precision",
        "classification/recall",
        "classification/f0.5",
        "classification/f1.0",
        "classification/f2.0",
    ]
    assert header == RESULT_COLUMNS + extra
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 41)]
    # computed at the evaluated steps (each epoch's last), blank elsewhere like the validation columns
    for r in rows:
        evaluated = int(r["step"]) % 4 == 0
        assert all((r[c] != "") == evaluated for c in extra + ["valid_loss"]), r
    model, tok = _load(result.model_dir)
    convs = [r["messages"] for r in read_jsonl(valid)]
    refs = [m[-1]["content"] for m in convs]
    max_new = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs) + 8
    preds = [_greedy(model, tok, m[:-1], max_new) for m in convs]
    want = _binary_by_hand(preds, refs, "yes", [0.5, 2])
    # the trained model answers labels and misses one: accuracy, precision and recall all differ
    assert len({want[f"classification/{k}"] for k in ("accuracy", "precision", "recall")}) == 3, preds
    assert {c: float(rows[-1][c]) for c in extra} == pytest.approx(want, abs=1e-5)
    # a run without the metrics keeps OpenAI's plain columns
    plain = quick_run_config(tiny_llama, train, tmp_path / "plain", **{"data.validation": str(valid)})
    out = run(plain).output_dir
    assert _results(out)[0] == RESULT_COLUMNS
    assert not [k for r in read_jsonl(out / "metrics.jsonl") for k in r if "/" in k or k == "valid_accuracy"]


@torch.no_grad()
def _loss_by_hand(model, tok, rows: list[dict]) -> tuple[float, int]:
    """(summed cross-entropy, supervised tokens) of the assistant replies, one row at a time."""
    from tunery.data import encode_chat
    from tunery.data.types import Conversation

    total, count = 0.0, 0
    for row in rows:
        feats = encode_chat(Conversation(row["messages"]), tok, 2048)
        logits = model(torch.tensor([feats["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(feats["labels"][1:])
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total, count


def test_multitask_validation_reports_each_task(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from tunery.cli import app

    colors = write_chat_jsonl(tmp_path / "colors.jsonl", n=12)
    yesno = _yes_no(tmp_path / "yesno.jsonl", TRAIN_YES_NO[:12])
    valid = {
        "colors": write_chat_jsonl(tmp_path / "colors.valid.jsonl", n=5, seed=1),
        "yesno": _yes_no(tmp_path / "yesno.valid.jsonl", VALID_YES_NO),
    }
    out = tmp_path / "run"
    sets = {
        "data.train": f"[{colors}, {yesno}]",
        "data.validation": f"[{valid['colors']}, {valid['yesno']}]",  # one file per task
        "method": "full",
        "compute_classification_metrics": "true",
        "hyperparameters.precision": "fp32",
        "hyperparameters.n_epochs": 8,
        "hyperparameters.batch_size": 6,
        "hyperparameters.learning_rate": 0.01,
        "hyperparameters.lr_scheduler": "constant",
    }
    argv = ["train", "--model", str(tiny_llama), "--output", str(out)]
    res = CliRunner().invoke(app, argv + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert res.exit_code == 0, res.output
    last = read_jsonl(out / "metrics.jsonl")[-1]
    model, tok = _load(out / "model")
    by_hand = {task: _loss_by_hand(model, tok, read_jsonl(path)) for task, path in valid.items()}
    for task, (total, count) in by_hand.items():
        assert last[f"valid_loss/{task}"] == pytest.approx(total / count, abs=1e-5)
    # the overall loss is the tasks' losses weighted by their supervised tokens
    weighted = sum(last[f"valid_loss/{t}"] * n for t, (_, n) in by_hand.items()) / sum(
        n for _, n in by_hand.values()
    )
    assert weighted == pytest.approx(last["valid_loss"], rel=1e-9)
    # colour names are no label set: accuracy for the yes/no task only, as `compare` scores tasks
    rows = read_jsonl(valid["yesno"])
    preds = [_greedy(model, tok, r["messages"][:-1], 10).strip().lower() for r in rows]
    hits = sum(p == r["messages"][-1]["content"] for p, r in zip(preds, rows, strict=True))
    assert last["valid_accuracy/yesno"] == pytest.approx(hits / len(rows))
    assert "valid_accuracy/colors" not in last
    event = [e for e in read_jsonl(out / "events.jsonl") if e["type"] == "metrics"][-1]
    assert event["data"]["valid_loss/yesno"] == last["valid_loss/yesno"]
    assert f"(colors {last['valid_loss/colors']:.4f}, yesno " in event["message"]
    assert f"  yesno: loss {last['valid_loss/yesno']:.4f}, accuracy {hits / len(rows):.1%}" in res.output


def test_validation_tasks_from_rows_or_files(tmp_path):
    from tunery.data import load_dataset
    from tunery.errors import ConfigError
    from tunery.train.run import merge_validation

    def load(name, colours, task=None):
        return load_dataset(_yes_no(tmp_path / name, colours, task), kind="chat")

    one = load("a.jsonl", VALID_YES_NO[:2])
    assert merge_validation([one]) == (one, None)  # one task, or none named: reported as before
    # rows naming their task (as `tunery logs compare` reads them); a row without one is `no_task`
    mixed = load_dataset(
        write_jsonl(
            tmp_path / "mixed.jsonl",
            [{**chat_row("q", "yes"), "task": "intent (v2)"}, {**chat_row("q", "no"), "source": "faq"}]
            + [chat_row("q", "no")],
        ),
        kind="chat",
    )
    assert merge_validation([mixed])[1] == ["intent _v2_", "faq", "no_task"]
    # one file per task: rows take their file's name unless they name a task themselves
    val, tasks = merge_validation(
        [load("routing.valid.jsonl", VALID_YES_NO[:2]), load("b.jsonl", VALID_YES_NO[:1], "x")]
    )
    assert tasks == ["routing", "routing", "x"] and len(val) == 3
    with pytest.raises(ConfigError) as err:
        merge_validation(
            [one, load_dataset(_yes_no(tmp_path / "a.valid.jsonl", VALID_YES_NO[:1]), kind="chat")]
        )
    assert err.value.param == "data.validation"
