"""Rich renderings of evaluation results: the `tunery eval` summary and the `tunery compare` table."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_eval(res: dict[str, Any], title: str = "Evaluation") -> Group:
    """Summary, per-class table, confusion matrix, invalid replies and sample predictions."""
    parts: list[Any] = []
    summary = Table(title=title, show_header=False)
    summary.add_column("metric", style="bold")
    summary.add_column("value", justify="right")
    rows = [("examples", str(res["n"])), ("exact match", _pct(res["exact_match"]))]
    if res.get("accuracy") is not None:
        rows += [
            ("accuracy", _pct(res["accuracy"])),
            ("macro F1", _num(res["macro_f1"])),
            ("weighted F1", _num(res["weighted_f1"])),
            ("invalid replies", str(res["invalid"])),
        ]
    for key, value in (res.get("binary") or {}).items():
        if key != "positive_class":
            rows.append((f"{key} ({res['binary']['positive_class']})", _num(value)))
    if res.get("chrf") is not None:
        rows += [("chrF", _num(res["chrf"], 1)), ("ROUGE-L", _num(res["rouge_l"], 1))]
    rows += [("loss", _num(res.get("loss"))), ("perplexity", _num(res.get("perplexity"), 2))]
    for name, value in rows:
        summary.add_row(name, value)
    parts.append(summary)
    if res.get("per_class"):
        labels = res["labels"]
        per = Table(title="Per class")
        for col in ("label", "precision", "recall", "F1", "support"):
            per.add_column(col, justify="left" if col == "label" else "right")
        for label in labels:
            c = res["per_class"][label]
            per.add_row(label, _num(c["precision"]), _num(c["recall"]), _num(c["f1"]), str(c["support"]))
        parts.append(per)
        cm = Table(title="Confusion matrix (rows: reference, columns: prediction)")
        cm.add_column("", style="bold")
        for label in labels:
            cm.add_column(label, justify="right")
        for label, row in zip(labels, res["confusion_matrix"], strict=True):
            cm.add_row(label, *[str(v) for v in row])
        parts.append(cm)
    if res.get("invalid_replies"):
        inv = Table(title=f"Replies outside the label set ({res['invalid']})")
        inv.add_column("reply")
        inv.add_column("count", justify="right")
        for item in res["invalid_replies"][:10]:
            inv.add_row(_clip(repr(item["reply"])), str(item["count"]))
        parts.append(inv)
    if res.get("examples"):
        ex = Table(title="Examples")
        for col in ("prompt", "reference", "prediction"):
            ex.add_column(col, overflow="fold")
        for item in res["examples"][:5]:
            style = "green" if item["correct"] else "red"
            ex.add_row(
                _clip(item["prompt"]),
                _clip(item["reference"], 40),
                f"[{style}]{_clip(item['prediction'], 40)}[/]",
            )
        parts.append(ex)
    return Group(*parts)


def render_compare(result: dict[str, Any]) -> Group:
    """One row per model/setting, side by side, then examples where the rows disagree."""
    rows = result["rows"]
    classification = any(r.get("accuracy") is not None for r in rows)
    table = Table(title=f"Comparison on {result['n']} examples")
    table.add_column("model", style="bold")
    cols = ["accuracy", "macro F1", "invalid"] if classification else ["chrF", "ROUGE-L"]
    cols += ["exact match", "loss", "perplexity"]
    if any("forgetting" in r for r in rows):
        cols.append("general-English ppl")
    probes = list(
        dict.fromkeys(k for r in rows for k in ((r.get("forgetting") or {}).get("benchmark") or {}))
    )
    cols += probes  # the lm-eval probe's scores (`--forgetting-benchmark`), one column per task
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = (
            [_pct(r["accuracy"]), _num(r["macro_f1"]), str(r["invalid"])]
            if classification
            else [_num(r["chrf"], 1), _num(r["rouge_l"], 1)]
        )
        cells += [_pct(r["exact_match"]), _num(r["loss"]), _num(r["perplexity"], 2)]
        if "general-English ppl" in cols:
            cells.append(_num((r.get("forgetting") or {}).get("perplexity"), 2))
        scores = (r.get("forgetting") or {}).get("benchmark") or {}
        cells += [_num(scores.get(k)) for k in probes]
        table.add_row(r["label"], *cells)
    parts: list[Any] = [table]
    if result["disagreements"]:
        dis = Table(
            title=f"Where the models disagree ({result['n_disagreements']} examples, "
            f"first {len(result['disagreements'])})"
        )
        dis.add_column("prompt", overflow="fold")
        dis.add_column("reference")
        for r in rows:
            dis.add_column(r["label"], overflow="fold")
        for item in result["disagreements"]:
            dis.add_row(
                _clip(item["prompt"], 50),
                _clip(item["reference"], 30),
                *[_clip(item["predictions"][r["label"]], 30) for r in rows],
            )
        parts.append(dis)
    return Group(*parts)
