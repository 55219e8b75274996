"""Metrics for generated replies: exact match, classification, chrF, ROUGE-L and perplexity.

Own implementations (no `evaluate`/`sacrebleu` dependency). Classification follows scikit-learn's
definitions, which the tests check on random labels: a reply outside the label set counts as wrong
(a false negative for its true class) and is also counted and listed as invalid.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from tunery.data.labels import is_label_set, normalize  # noqa: F401  (M.is_label_set for evaluation)
from tunery.data.types import IGNORE
from tunery.errors import TuneryError
from tunery.models import placement
from tunery.models.unwrap import unwrap

_WS = re.compile(r"\s+")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after `normalize`."""
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def f_beta(precision: float, recall: float, beta: float = 1.0) -> float:
    b2 = beta * beta
    return _safe_div((1 + b2) * precision * recall, b2 * precision + recall)


_POSITIVE_NAMES = ("positive", "yes", "true", "1", "pos", "spam", "relevant")


def _default_positive(labels: list[str]) -> str:
    for name in _POSITIVE_NAMES:
        if name in labels:
            return name
    return labels[-1]


def classification_metrics(
    predictions: list[str],
    references: list[str],
    labels: list[str] | None = None,
    positive_class: str | None = None,
    betas: list[float] | None = None,
    max_listed: int = 20,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro/weighted F1, confusion matrix, invalid replies.

    `labels` defaults to the sorted distinct normalized references. The confusion matrix is
    `matrix[true][predicted]` over `labels`; replies outside the set are not in it and are reported
    under `invalid` / `invalid_replies`. For two labels a `binary` block gives precision, recall, F1 and
    each requested F-beta for `positive_class` (default: a label named like "positive"/"yes", else the last).
    """
    refs = [normalize(r) for r in references]
    preds = [normalize(p) for p in predictions]
    labels = [normalize(x) for x in labels] if labels else sorted(set(refs))
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r for r in refs if r not in index})
    if unknown:
        raise TuneryError(f"References {unknown[:5]} are not in the label set {labels}.", param="labels")
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    invalid = Counter()
    for p, r in zip(preds, refs, strict=True):
        if p in index:
            matrix[index[r]][index[p]] += 1
        else:
            invalid[p] += 1
    n = len(refs)
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(matrix[j][i] for j in range(k))
        support = sum(1 for r in refs if r == label)
        precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f_beta(precision, recall),
            "support": support,
        }
    present = [c for c in per_class.values() if c["support"] > 0] or list(per_class.values())
    out: dict[str, Any] = {
        "accuracy": _safe_div(sum(matrix[i][i] for i in range(k)), n),
        "labels": labels,
        "per_class": per_class,
        "macro_f1": _safe_div(sum(c["f1"] for c in present), len(present)),
        "weighted_f1": _safe_div(sum(c["f1"] * c["support"] for c in per_class.values()), n),
        "confusion_matrix": matrix,
        "invalid": sum(invalid.values()),
        "invalid_replies": [{"reply": reply, "count": c} for reply, c in invalid.most_common(max_listed)],
    }
    if k == 2:
        pos = normalize(positive_class) if positive_class else _default_positive(labels)
        if pos not in index:
            raise TuneryError(
                f"Positive class {positive_class!r} is not one of the labels {labels}.",
                param="positive_class",
            )
        c = per_class[pos]
        binary: dict[str, Any] = {
            "positive_class": pos,
            "precision": c["precision"],
            "recall": c["recall"],
            "f1": c["f1"],
        }
        for beta in betas or []:
            binary[f"f{beta:g}"] = f_beta(c["precision"], c["recall"], beta)
        out["binary"] = binary
    elif positive_class or betas:
        out["binary"] = None  # asked for, but the task is not binary
    return out


# ----- free text -----
def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(predictions: list[str], references: list[str], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015), 0-100: character n-gram precision and recall for n = 1..order.

    Whitespace is removed as in sacreBLEU; matches and counts are summed over the corpus per order,
    precision and recall are averaged over the orders that occur, then combined with F-beta.
    """
    matches, hyp_total, ref_total = [0] * order, [0] * order, [0] * order
    for p, r in zip(predictions, references, strict=True):
        hyp, ref = _WS.sub("", p or ""), _WS.sub("", r or "")
        for n in range(1, order + 1):
            h, g = _char_ngrams(hyp, n), _char_ngrams(ref, n)
            matches[n - 1] += sum((h & g).values())
            # a sentence whose reference has no n-grams of this order adds none (as sacreBLEU)
            hyp_total[n - 1] += sum(h.values()) if g else 0
            ref_total[n - 1] += sum(g.values())
    orders = [i for i in range(order) if hyp_total[i] and ref_total[i]]
    if not orders:
        return 0.0
    precision = sum(matches[i] / hyp_total[i] for i in orders) / len(orders)
    recall = sum(matches[i] / ref_total[i] for i in orders) / len(orders)
    return 100 * f_beta(precision, recall, beta)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", (text or "").lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (longest common word subsequence), 0-100."""
    if not references:
        return 0.0
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        hyp, ref = _words(p), _words(r)
        lcs = _lcs(hyp, ref)
        total += f_beta(_safe_div(lcs, len(hyp)), _safe_div(lcs, len(ref)))
    return 100 * total / len(references)


# ----- perplexity -----
def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); inf when nothing was scored."""
    if n_tokens <= 0:
        return float("inf")
    return math.exp(min(nll_sum / n_tokens, 700.0))


def sequence_nll(
    model: Any, sequences: list[dict[str, list[int]]], batch_size: int = 8, autocast: bool | None = None
) -> tuple[float, int]:
    """(summed NLL, scored tokens) of `labels` (IGNORE = not scored) given `input_ids`, teacher-forced.

    Only positions with a label reach the LM head, so long prompts cost no vocabulary projection.
    """
    import torch

    device = placement.model_device(model)
    use_bf16 = (placement.bf16_supported(device) if autocast is None else autocast) and next(
        model.parameters()
    ).dtype == torch.float32
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]["input_ids"]))
    total, count = 0.0, 0
    base = unwrap(model)
    # The decoder's last hidden state (after the final norm) and the LM head, applied by hand so
    # only scored positions are projected onto the vocabulary. A peft model's layers are injected
    # in place, so its adapters take part.
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    for start in range(0, len(order), batch_size):
        ids, labels, mask = _right_padded([sequences[i] for i in order[start : start + batch_size]], device)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if not keep.any():
            continue
        with torch.inference_mode(), placement.autocast(device, use_bf16):
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][keep]
            logits = head(hidden).float()
        total += float(torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def _right_padded(chunk: list[dict[str, list[int]]], device: Any) -> tuple[Any, Any, Any]:
    """(ids, labels, mask), right-padded so positions stay 0..len-1; built on the host, copied once."""
    import torch

    width = max(len(s["input_ids"]) for s in chunk)
    ids = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, s in enumerate(chunk):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def text_perplexity(
    model: Any, tokenizer: Any, text: str, window: int = 512, stride: int = 256, max_tokens: int | None = 8192
) -> dict[str, float]:
    """Perplexity of a plain text with a sliding window (each token scored once, with context)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    limit = getattr(model.config, "max_position_embeddings", None) or window
    window = min(window, limit)
    stride = min(stride, window)
    seqs: list[dict[str, list[int]]] = []
    scored_upto = 0
    for start in range(0, max(1, len(ids) - 1), stride):
        end = min(start + window, len(ids))
        piece = ids[start:end]
        # Score only tokens not scored by an earlier window; the rest are context.
        first_new = max(scored_upto - start, 1)
        labels = [IGNORE] * first_new + piece[first_new:]
        seqs.append({"input_ids": piece, "labels": labels[: len(piece)]})
        scored_upto = end
        if end == len(ids):
            break
    nll, n = sequence_nll(model, seqs)
    return {"loss": nll / n if n else float("nan"), "perplexity": perplexity(nll, n), "tokens": n}
