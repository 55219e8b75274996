"""Dataset statistics (`tunery data stats`): token lengths, label balance, duplicates and leakage.

Near-duplicates are found with MinHash over word 3-gram shingles and LSH banding (16 bands x 4 rows),
then confirmed with the exact Jaccard similarity of the shingle sets, so a reported pair really has
Jaccard >= the threshold (0.8 by default); banding only decides which pairs are compared. The exact
check keeps the report free of MinHash's estimation noise; banding keeps it near-linear in the data
size. Texts are normalised (lowercase, collapsed whitespace) before hashing, so whitespace and case
changes count as exact duplicates.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunery.data.formats import load_dataset
from tunery.data.labels import is_label_set
from tunery.data.labels import normalize as label_norm
from tunery.data.types import Conversation, Labeled, PreferencePair, Text, Unpaired

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
N_BANDS, BAND_ROWS = 16, 4
_PRIME = (1 << 61) - 1


def example_text(example: Any) -> str:
    """The whole text of an example in one string (what duplicates and leakage compare)."""
    if isinstance(example, Conversation):
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in example.messages)
    if isinstance(example, PreferencePair):
        msgs = example.prompt + example.chosen
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in msgs)
    if isinstance(example, Unpaired):
        msgs = example.prompt + example.completion
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in msgs)
    if isinstance(example, Text | Labeled):
        return example.text
    return str(example)


def prompt_text(example: Any) -> str:
    """The input side only: a test prompt seen in training is leakage even when the answer differs."""
    if isinstance(example, Conversation):
        msgs = example.messages
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
        return "\n".join(str(m.get("content") or "") for m in msgs[:last] if m.get("role") != "system")
    if isinstance(example, PreferencePair | Unpaired):
        return "\n".join(str(m.get("content") or "") for m in example.prompt if m.get("role") != "system")
    return example_text(example)


def normalize(text: str) -> str:
    return _WS.sub(" ", text.strip().lower())


def shingles(text: str, n: int = 3) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


class MinHasher:
    """MinHash signatures with N_BANDS * BAND_ROWS universal hash functions (fixed seeds)."""

    def __init__(self, num_perm: int = N_BANDS * BAND_ROWS, seed: int = 1):
        rng = random.Random(seed)
        self.params = [(rng.randrange(1, _PRIME), rng.randrange(0, _PRIME)) for _ in range(num_perm)]

    def signature(self, shingle_set: set[str]) -> tuple[int, ...]:
        if not shingle_set:
            return tuple([_PRIME] * len(self.params))
        hashes = [_hash64(s) for s in shingle_set]
        return tuple(min((a * h + b) % _PRIME for h in hashes) for a, b in self.params)


def _bands(sig: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    return [(b, sig[b * BAND_ROWS : (b + 1) * BAND_ROWS]) for b in range(N_BANDS)]


def near_duplicate_pairs(
    left: list[str], right: list[str] | None = None, threshold: float = 0.8
) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) for near-duplicate pairs: within `left` (i < j), or between left[i] and right[j]."""
    hasher = MinHasher()
    left_sh = [shingles(t) for t in left]
    right_sh = left_sh if right is None else [shingles(t) for t in right]
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, sh in enumerate(left_sh):
        for key in _bands(hasher.signature(sh)):
            buckets.setdefault(key, []).append(i)
    found: dict[tuple[int, int], float] = {}
    targets = range(len(right_sh))
    right_sigs = [hasher.signature(sh) for sh in right_sh] if right is not None else [None] * len(right_sh)
    for j in targets:
        sig = right_sigs[j]
        if right is None or sig is None:
            continue
        for key in _bands(sig):
            for i in buckets.get(key, []):
                if (i, j) not in found:
                    found[(i, j)] = jaccard(left_sh[i], right_sh[j])
    if right is None:
        for members in buckets.values():
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    if (i, j) not in found:
                        found[(i, j)] = jaccard(left_sh[i], left_sh[j])
    return sorted((i, j, s) for (i, j), s in found.items() if s >= threshold)


@dataclass
class DuplicateReport:
    exact_groups: list[list[int]] = field(default_factory=list)  # example lines, each group >= 2
    near_pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (line, line, jaccard)

    @property
    def n_exact(self) -> int:
        """Examples that repeat an earlier one exactly (removable without losing content)."""
        return sum(len(g) - 1 for g in self.exact_groups)


def duplicates(examples: list[Any], threshold: float = 0.8) -> DuplicateReport:
    """Exact duplicate groups and near-duplicate pairs (not already exact) of one dataset."""
    texts = [normalize(example_text(e)) for e in examples]
    lines = [getattr(e, "line", i + 1) or i + 1 for i, e in enumerate(examples)]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    report = DuplicateReport(exact_groups=[[lines[i] for i in g] for g in groups.values() if len(g) > 1])
    report.near_pairs = [
        (lines[i], lines[j], round(s, 3))
        for i, j, s in near_duplicate_pairs(texts, threshold=threshold)
        if texts[i] != texts[j]
    ]
    return report


@dataclass
class LeakageReport:
    """Examples of the other set (test/validation) that also appear, exactly or nearly, in training."""

    n_other: int
    exact: list[tuple[int, int]] = field(default_factory=list)  # (other line, train line)
    near: list[tuple[int, int, float]] = field(default_factory=list)  # (other line, train line, jaccard)
    threshold: float = 0.8

    @property
    def leaked_lines(self) -> list[int]:
        return sorted({o for o, _ in self.exact} | {o for o, _, _ in self.near})

    @property
    def count(self) -> int:
        return len(self.leaked_lines)

    @property
    def fraction(self) -> float:
        return self.count / self.n_other if self.n_other else 0.0

    def message(self, other_name: str = "the validation file") -> str | None:
        """A one-line warning, or None when nothing leaked."""
        if not self.count:
            return None
        shown = ", ".join(str(x) for x in self.leaked_lines[:8]) + (" ..." if self.count > 8 else "")
        return (
            f"Leakage: {self.count} of {self.n_other} examples in {other_name} ({self.fraction:.1%}) "
            f"also appear in the training data ({len(self.exact)} exact, {len(self.near)} near-duplicate "
            f"prompts, Jaccard >= {self.threshold}); lines {shown}. Their scores will be optimistic."
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "count": self.count, "fraction": round(self.fraction, 4)}


def leakage(train_examples: list[Any], other_examples: list[Any], threshold: float = 0.8) -> LeakageReport:
    """Which `other_examples` overlap the training set: the same prompt exactly (normalised), or a
    near-duplicate prompt (word 3-gram Jaccard >= threshold)."""
    train = [normalize(prompt_text(e)) for e in train_examples]
    other = [normalize(prompt_text(e)) for e in other_examples]
    tlines = [getattr(e, "line", i + 1) or i + 1 for i, e in enumerate(train_examples)]
    olines = [getattr(e, "line", i + 1) or i + 1 for i, e in enumerate(other_examples)]
    index: dict[str, int] = {}
    for i, t in enumerate(train):
        index.setdefault(t, i)
    report = LeakageReport(n_other=len(other), threshold=threshold)
    exact_other = set()
    for j, t in enumerate(other):
        if t in index:
            report.exact.append((olines[j], tlines[index[t]]))
            exact_other.add(j)
    best: dict[int, tuple[int, float]] = {}
    for i, j, s in near_duplicate_pairs(train, other, threshold):
        if j not in exact_other and s > best.get(j, (0, 0.0))[1]:
            best[j] = (i, s)
    report.near = [(olines[j], tlines[i], round(s, 3)) for j, (i, s) in sorted(best.items())]
    return report


def labels_of(examples: list[Any]) -> list[str] | None:
    """Class labels when the data has them: Labeled examples, or chat replies that form a label set."""
    if examples and all(isinstance(e, Labeled) for e in examples):
        return [label for e in examples for label in e.labels]
    if examples and all(isinstance(e, Conversation) for e in examples):
        replies = []
        for e in examples:
            assistant = [m for m in e.messages if m.get("role") == "assistant"]
            replies.append(str(assistant[-1].get("content") or "") if assistant else "")
        if is_label_set(replies):
            return [label_norm(r) for r in replies]
    if examples and all(isinstance(e, Unpaired) for e in examples):
        return ["desirable" if e.desirable else "undesirable" for e in examples]
    return None


def token_lengths(examples: list[Any], tokenizer: Any | None) -> tuple[list[int], str]:
    """Tokens per example with the model's tokenizer; words x 1.3 without one (stated in the unit)."""
    texts = [example_text(e) for e in examples]
    if tokenizer is None:
        # ~1.3 BPE tokens per English word: a rough stand-in when no model is given.
        return [round(len(t.split()) * 1.3) for t in texts], "estimated tokens (words x 1.3)"
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts], "tokens"


def histogram(values: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of equal width covering min..max."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [
        (lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range((hi - lo) // width + 1)
    ]


def histogram_text(values: list[int], unit: str, bins: int = 10, width: int = 40) -> str:
    rows = histogram(values, bins)
    top = max((c for _, _, c in rows), default=1) or 1
    lines = [f"Length histogram ({unit}):"]
    for low, high, count in rows:
        lines.append(f"  {low:>7}-{high:<7} {'#' * round(width * count / top):<{width}} {count}")
    return "\n".join(lines)


def plot_histogram(values: list[int], unit: str, out: Path, test_values: list[int] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=min(40, max(5, len(set(values)))), alpha=0.7, label="train")
    if test_values:
        ax.hist(test_values, bins=min(40, max(5, len(set(test_values)))), alpha=0.6, label="test")
        ax.legend()
    ax.set_xlabel(unit)
    ax.set_ylabel("examples")
    ax.set_title("Example length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def pct(q: float) -> int:
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]

    return {
        "n": len(s),
        "min": s[0],
        "mean": round(sum(s) / len(s), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": s[-1],
        "total": sum(s),
    }


def data_stats(
    path: str | Path,
    test: str | Path | None = None,
    tokenizer: Any | None = None,
    output: str | Path | None = None,
    threshold: float = 0.8,
) -> dict[str, Any]:
    """Everything `tunery data stats` shows, as a dict; with `output`, also stats.json,
    lengths.png and lengths.txt in that directory."""
    ds = load_dataset(path)
    lengths, unit = token_lengths(ds.examples, tokenizer)
    labels = labels_of(ds.examples)
    dups = duplicates(ds.examples, threshold)
    out: dict[str, Any] = {
        "file": str(path),
        "format": ds.format,
        "kind": ds.kind,
        "examples": len(ds),
        "length_unit": unit,
        "lengths": _summary(lengths),
        "histogram": [list(r) for r in histogram(lengths)],
        "histogram_text": histogram_text(lengths, unit),
        "labels": dict(Counter(labels).most_common()) if labels else None,
        "duplicates": {
            "exact_groups": dups.exact_groups,
            "n_exact": dups.n_exact,
            "near_pairs": [list(p) for p in dups.near_pairs],
            "threshold": threshold,
        },
        "test": None,
    }
    test_lengths = None
    if test is not None:
        test_ds = load_dataset(test)
        test_lengths, _ = token_lengths(test_ds.examples, tokenizer)
        test_labels = labels_of(test_ds.examples)
        leak = leakage(ds.examples, test_ds.examples, threshold)
        out["test"] = {
            "file": str(test),
            "examples": len(test_ds),
            "lengths": _summary(test_lengths),
            "labels": dict(Counter(test_labels).most_common()) if test_labels else None,
            "leakage": leak.to_dict(),
            "leakage_message": leak.message(str(test)),
        }
    if output is not None:
        d = Path(output)
        d.mkdir(parents=True, exist_ok=True)
        plot_histogram(lengths, unit, d / "lengths.png", test_lengths)
        (d / "lengths.txt").write_text(out["histogram_text"] + "\n")
        (d / "stats.json").write_text(json.dumps(out, indent=2))
        out["files"] = [str(d / "stats.json"), str(d / "lengths.png"), str(d / "lengths.txt")]
    return out


def warn_leakage(train_examples: list[Any], other_examples: list[Any] | None, emit: Any, name: str) -> None:
    """For `tunery train`: emit a warn-level event when the validation data overlaps the training data."""
    if not other_examples:
        return
    msg = leakage(train_examples, other_examples).message(name)
    if msg:
        emit(msg, level="warn")
