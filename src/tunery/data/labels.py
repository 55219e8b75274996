"""Class labels in text: the one normalization ("Positive." == "positive") and the test for replies
that form a label set. Data statistics and evaluation metrics both use them."""

from __future__ import annotations

import re
import string

_TRAILING = string.punctuation + " \t\n\r"
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, drop quotes and trailing punctuation: "Positive." == "positive"."""
    text = _WS.sub(" ", (text or "").strip().lower())
    text = text.strip("\"'`")
    return text.rstrip(_TRAILING).strip("\"'` ")


def is_label_set(references: list[str], max_labels: int = 20, max_chars: int = 40) -> bool:
    """Do the references look like class labels: few distinct short values, each used repeatedly?"""
    labels = {normalize(r) for r in references}
    if not references or len(labels) < 2 or len(labels) > max_labels:
        return False
    return len(labels) <= max(2, len(references) // 2) and all(len(x) <= max_chars for x in labels)
