"""Classification heads after training: load, predict probabilities, evaluate with calibration
(`tunery classify`, classify_cli.py, and `tunery quickstart --head`, workflows/quickstart.py, use these).

Metrics are the ones `tunery eval` reports for generated labels (`classification_metrics`), plus log
loss and calibration: the expected calibration error (ECE) over equal-width confidence bins, and
the bins themselves (a reliability diagram in numbers).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from tunery.data import load_dataset
from tunery.errors import DataError, ModelError, TuneryError
from tunery.evaluate.metrics import classification_metrics
from tunery.methods import read_info
from tunery.methods.loading import load_saved_method, saved_tokenizer
from tunery.models import load_model, load_tokenizer
from tunery.models.placement import model_device, place
from tunery.objectives.classify import (
    check_labels,
    class_logits,
    encode_text,
    is_encoder,
    load_classification_model,
    scoring_only,
)
from tunery.objectives.common import collate_rows
from tunery.terminal import console


def is_classifier(adapter: str | Path | None) -> bool:
    """True when `adapter` is a saved model dir of a `classify` run."""
    if not adapter:
        return False
    try:
        return read_info(adapter).get("objective") == "classify"
    except TuneryError:
        return False


def load_classifier(model: str | None, adapter: str | Path | None = None, dtype: Any = None):
    """(classifier, tokenizer, info) from a saved `classify` model dir (adapter), or a plain
    sequence-classification model dir with id2label (model only). `info` has labels/multi_label/threshold."""
    if adapter is None:
        if model is None:
            raise TuneryError("Pass --model, --adapter, or both.")
        clf = place(scoring_only(load_model(model, dtype=dtype, task="sequence-classification")).eval())
        labels = [clf.config.id2label[i] for i in range(clf.config.num_labels)]
        multi = clf.config.problem_type == "multi_label_classification"
        return clf, load_tokenizer(model), {"labels": labels, "multi_label": multi, "threshold": 0.5}
    info = read_info(adapter)
    if info.get("objective") != "classify" or not info.get("labels"):
        raise ModelError(
            f"{adapter} was trained with objective {info.get('objective')!r}, not 'classify'.",
            hint="Train a classifier with `objective: classify` on labeled data.",
            param="adapter",
        )
    spec = model or info.get("base_model")
    tokenizer = saved_tokenizer(info, spec)

    def build_base(**kwargs: Any) -> Any:
        multi_label = bool(info.get("multi_label"))
        return load_classification_model(spec, info["labels"], multi_label=multi_label, dtype=dtype, **kwargs)

    clf = place(load_saved_method(info, build_base).eval())
    return clf, tokenizer, {k: info.get(k) for k in ("labels", "multi_label", "threshold")}


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    multi_label: bool = False,
    batch_size: int = 32,
    max_length: int = 512,
) -> list[list[float]]:
    """Probabilities per text and label (softmax, or a sigmoid per label with multi_label)."""
    import torch

    encoder = is_encoder(model)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = [
                encode_text(t, tokenizer, max_length, encoder)["input_ids"]
                for t in texts[start : start + batch_size]
            ]
            batch = collate_rows(rows, None, pad, packed=False)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = class_logits(model, batch)
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
            out.extend(probs.tolist())
    return out


def calibration(confidences: list[float], correct: list[bool], n_bins: int = 10) -> dict[str, Any]:
    """ECE = sum over bins of (bin share) * |accuracy - mean confidence|, with the bins."""
    bins = []
    ece = 0.0
    n = max(1, len(confidences))
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0)]
        if not idx:
            bins.append({"low": lo, "high": hi, "count": 0, "confidence": None, "accuracy": None})
            continue
        conf = sum(confidences[i] for i in idx) / len(idx)
        acc = sum(correct[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        bins.append({"low": lo, "high": hi, "count": len(idx), "confidence": conf, "accuracy": acc})
    return {"ece": ece, "n_bins": n_bins, "bins": bins}


def load_labeled(path: str | Path) -> list[Any]:
    return load_dataset(path, kind="labeled").examples


def _multi_label_metrics(
    probs: list[list[float]], examples: list[Any], labels: list[str], threshold: float, eps: float
) -> tuple[dict[str, Any], list[str], float]:
    """(metrics, predictions as comma-joined labels, log loss) of multi-label probabilities."""
    preds = [[labels[j] for j, p in enumerate(row) if p > threshold] for row in probs]
    truth = [[1.0 if lab in e.labels else 0.0 for lab in labels] for e in examples]
    log_loss = -sum(
        y * math.log(max(p, eps)) + (1 - y) * math.log(max(1 - p, eps))
        for row, ys in zip(probs, truth, strict=True)
        for p, y in zip(row, ys, strict=True)
    ) / (len(examples) * len(labels))
    correct = [set(p) == set(e.labels) for p, e in zip(preds, examples, strict=True)]
    flat_conf = [max(p, 1 - p) for row in probs for p in row]
    flat_ok = [
        (p > threshold) == (y > 0.5)
        for row, ys in zip(probs, truth, strict=True)
        for p, y in zip(row, ys, strict=True)
    ]
    res: dict[str, Any] = {"n": len(examples), "accuracy": sum(correct) / len(examples)}
    per_label = {}
    for j, lab in enumerate(labels):
        tp = sum(1 for row, ys in zip(probs, truth, strict=True) if row[j] > threshold and ys[j])
        fp = sum(1 for row, ys in zip(probs, truth, strict=True) if row[j] > threshold and not ys[j])
        fn = sum(1 for row, ys in zip(probs, truth, strict=True) if row[j] <= threshold and ys[j])
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        per_label[lab] = {
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        }
    res["per_class"] = per_label
    res["macro_f1"] = sum(v["f1"] for v in per_label.values()) / len(labels)
    res["calibration"] = calibration(flat_conf, flat_ok)
    predictions = [",".join(p) for p in preds]
    return res, predictions, log_loss


def evaluate_classifier(
    model: Any,
    tokenizer: Any,
    data: str | Path | list[Any],
    labels: list[str],
    *,
    multi_label: bool = False,
    threshold: float = 0.5,
    positive_class: str | None = None,
    betas: list[float] | None = None,
    batch_size: int = 32,
    n_examples: int = 5,
) -> dict[str, Any]:
    """Accuracy/precision/recall/F1/confusion (as for generated labels), log loss and calibration,
    and inference throughput, on a labeled (or chat-with-label-reply) file or examples."""
    examples = load_labeled(data) if isinstance(data, str | Path) else list(data)
    if not examples:
        raise DataError("No examples to evaluate.", file=str(data))
    check_labels(str(data) if isinstance(data, str | Path) else "examples", examples, labels)
    t = time.perf_counter()
    probs = predict_proba(
        model, tokenizer, [e.text for e in examples], multi_label=multi_label, batch_size=batch_size
    )
    seconds = time.perf_counter() - t
    eps = 1e-12
    index = {label: i for i, label in enumerate(labels)}
    if multi_label:
        res, predictions, log_loss = _multi_label_metrics(probs, examples, labels, threshold, eps)
    else:
        predictions = [labels[max(range(len(row)), key=row.__getitem__)] for row in probs]
        refs = [e.labels[0] for e in examples]
        res = classification_metrics(predictions, refs, labels, positive_class=positive_class, betas=betas)
        log_loss = -sum(math.log(max(row[index[r]], eps)) for row, r in zip(probs, refs, strict=True)) / len(
            refs
        )
        res["calibration"] = calibration(
            [max(row) for row in probs], [p == r for p, r in zip(predictions, refs, strict=True)]
        )
        res["n"] = len(examples)
    res["log_loss"] = log_loss
    res["labels"] = labels
    res["examples_per_second"] = len(examples) / seconds if seconds > 0 else None
    res["examples"] = [
        {
            "text": e.text,
            "reference": ",".join(e.labels),
            "prediction": p,
            "probabilities": dict(zip(labels, row, strict=True)),
        }
        for e, p, row in list(zip(examples, predictions, probs, strict=True))[:n_examples]
    ]
    res["predictions"] = [
        {"label": p, "probabilities": dict(zip(labels, row, strict=True))}
        for p, row in zip(predictions, probs, strict=True)
    ]
    return res


def render_classifier_eval(res: dict[str, Any], title: str) -> Any:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    table.add_row("examples", str(res["n"]))
    table.add_row("accuracy", f"{100 * res['accuracy']:.1f}%")
    table.add_row("macro F1", f"{res['macro_f1']:.3f}")
    table.add_row("log loss", f"{res['log_loss']:.4f}")
    table.add_row("ECE (10 bins)", f"{res['calibration']['ece']:.4f}")
    if res.get("examples_per_second"):
        table.add_row("inference examples/s", f"{res['examples_per_second']:.1f}")
    return table


def prediction_row(text: str | None, probs: list[float], info: dict[str, Any]) -> dict[str, Any]:
    labels = info["labels"]
    if info.get("multi_label"):
        label: Any = [lab for lab, p in zip(labels, probs, strict=True) if p > (info.get("threshold") or 0.5)]
    else:
        label = labels[max(range(len(probs)), key=probs.__getitem__)]
    row = {"label": label, "probabilities": dict(zip(labels, probs, strict=True))}
    return {"text": text, **row} if text is not None else row


# --------------------------------------------------------------------------- quickstart --head


def eval_classifier_command(
    model: str | None,
    adapter: str,
    data: Path,
    output: Path,
    positive_class: str | None = None,
    betas: list[float] | None = None,
) -> dict[str, Any]:
    """`tunery eval` on a classify model: writes eval.json and predictions.jsonl like the generative path."""
    with console.status(f"Loading {adapter}…"):
        clf, tok, info = load_classifier(model, adapter)
    res = evaluate_classifier(
        clf,
        tok,
        data,
        info["labels"],
        multi_label=bool(info.get("multi_label")),
        threshold=info.get("threshold") or 0.5,
        positive_class=positive_class,
        betas=betas,
    )
    predictions = res.pop("predictions")
    res.update({"model": model, "adapter": adapter, "data": str(data), "kind": "classification_head"})
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    with (output / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    console.print(render_classifier_eval(res, f"Evaluation of {adapter} on {data}"))
    console.print(f"Wrote [bold]{output / 'eval.json'}[/]")
    return res
