"""Scores of replies against reference replies, overall and per task: exact match, and classification
metrics when the references form a label set, chrF otherwise. Shared by the comparison on held-out data
(`heldout.compare_on_heldout`) and the training hook's per-task accuracies (`run.classification_eval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunery.data.types import Message
from tunery.evaluate import metrics as M


@dataclass(frozen=True)
class Example:
    prompt: list[Message]
    tools: list[dict[str, Any]] | None
    reference: str
    task: str | None = None  # the row's task, when it names one (multi-task data)


def scores(
    replies: list[str], refs: list[str], label_set: bool, labels: list[str] | None, per_class: bool = True
) -> dict:
    out: dict[str, Any] = {"exact_match": M.exact_match(replies, refs)}
    if label_set:
        cls = M.classification_metrics(replies, refs, labels)
        keys = ("accuracy", "macro_f1", "weighted_f1", "invalid", *(("per_class",) if per_class else ()))
        out.update({k: cls[k] for k in keys})
    else:
        out["chrf"] = M.chrf(replies, refs)
    return out


def per_task(
    examples: list[Example], replies: dict[str, list[str]], labels: list[str] | None
) -> dict[str, Any] | None:
    """Each task's own scores, when the examples name tasks: a label set is detected per task (a mix
    may hold a classification task and a generation task). None when no example names one."""
    if not any(e.task for e in examples):
        return None
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.task or "(no task)", []).append(i)
    out = {}
    for name, idx in sorted(groups.items()):
        refs = [examples[i].reference for i in idx]
        seen = {M.normalize(r) for r in refs}
        wanted = [x for x in labels if M.normalize(x) in seen] if labels else None
        label_set = bool(wanted) or M.is_label_set(refs)
        models = [
            {"label": label, **scores([got[i] for i in idx], refs, label_set, wanted, per_class=False)}
            for label, got in replies.items()
        ]
        out[name] = {"n": len(idx), "task": "classification" if label_set else "generation", "models": models}
    return out
