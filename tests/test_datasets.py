"""Checks on the bundled datasets under `datasets/`: shape, labels, balance, split hygiene, lengths.

Only json and the standard library, so the whole file runs in well under a second. Training and
evaluation (quickstart, bench) read these files, so a broken line here would surface much later as a
confusing failure deep inside a run.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1] / "datasets"
SPLITS = ("train", "validation", "test")
SENTIMENT_SYSTEM = (
    "Classify the sentiment of the review as positive, negative or mixed. Answer with the label only."
)
SENTIMENT_LABELS = {"positive", "negative", "mixed"}
ROUTING_SYSTEM = (
    "Route the customer message to the team that should handle it: billing, technical, shipping, "
    "account or sales. Answer with the team name only."
)
ROUTING_LABELS = ("billing", "technical", "shipping", "account", "sales")
# Words that point at each team's subject. A message that mentions another team's words is one of
# the deliberate overlaps (a refund for a late parcel): routing by keyword must not be enough.
ROUTING_KEYWORDS = {
    "billing": r"refund|charg|invoice|bill|payment|paid|receipt|money",
    "technical": r"\bapp\b|error|firmware|crash|wifi|bug|update|setting",
    "shipping": r"deliver|parcel|tracking|courier|ship|return",
    "account": r"log ?in|sign|password|account|2fa|hack",
    "sales": r"buy|price|quote|discount|\border\b|purchase",
}
# Cross-split near-duplicate threshold from the dataset brief: word 3-gram Jaccard must stay below it.
NEAR_DUP_JACCARD = 0.5

# (folder, expected sizes per split, roughly): the brief's targets, with some slack for hand-written data.
GALLERY_SIZES = {
    "sentiment": {"train": (270, 330), "validation": (40, 50), "test": (80, 100)},
    "extraction": {"train": (70, 90), "validation": (12, 18), "test": (20, 30)},
    "qa": {"train": (70, 90), "validation": (12, 18), "test": (20, 30)},
    "rewrite": {"train": (50, 70), "validation": (8, 12), "test": (16, 24)},
}
ORDER_KEYS = ["name", "product", "quantity", "date"]
JOB_KEYS = ["title", "company", "location", "salary", "remote"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{path}:{lineno}: blank line"
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # name the line, like the real loader would
                pytest.fail(f"{path}:{lineno}: invalid JSON: {e}")
    return rows


def load_split(folder: str, split: str) -> list[dict[str, Any]]:
    return read_jsonl(ROOT / folder / f"{split}.jsonl")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def trigrams(text: str) -> frozenset[tuple[str, ...]]:
    w = words(text)
    return frozenset(tuple(w[i : i + 3]) for i in range(len(w) - 2))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def user_text(row: dict[str, Any]) -> str:
    """The model input of a row: what must not leak between splits."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
    return "\n".join(m["content"] for m in row["prompt"])


def assert_chat_row(row: dict[str, Any], roles: list[str], where: str) -> None:
    assert set(row) == {"messages"}, f"{where}: unexpected keys {sorted(row)}"
    msgs = row["messages"]
    assert [m.get("role") for m in msgs] == roles, f"{where}: roles {[m.get('role') for m in msgs]}"
    for m in msgs:
        assert set(m) == {"role", "content"}, f"{where}: message keys {sorted(m)}"
        assert isinstance(m["content"], str) and m["content"].strip(), f"{where}: empty content"
        assert m["content"] == m["content"].strip(), f"{where}: content has surrounding whitespace"


def assert_splits_clean(splits: dict[str, list[dict[str, Any]]], name: str) -> None:
    """No exact duplicates inside a split, no near-duplicate inputs across splits."""
    grams = {}
    for split, rows in splits.items():
        dumped = [json.dumps(r, sort_keys=True) for r in rows]
        dupes = [d for d, n in Counter(dumped).items() if n > 1]
        assert not dupes, f"{name}/{split}: exact duplicate rows: {dupes[:2]}"
        grams[split] = [(user_text(r), trigrams(user_text(r))) for r in rows]
    worst = (0.0, "", "")
    for a, b in itertools.combinations(grams, 2):
        for ta, ga in grams[a]:
            for tb, gb in grams[b]:
                j = jaccard(ga, gb)
                if j > worst[0]:
                    worst = (j, f"{a}: {ta[:80]}", f"{b}: {tb[:80]}")
    assert worst[0] < NEAR_DUP_JACCARD, f"{name}: cross-split near-duplicate (J={worst[0]:.2f}): {worst[1:]}"


# --- every folder is documented -------------------------------------------------------------------


def test_every_dataset_folder_has_a_readme_and_is_indexed() -> None:
    index = (ROOT / "README.md").read_text(encoding="utf-8")
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir())
    assert folders == [
        "chat_bench",
        "extraction",
        "preference",
        "qa",
        "reference",
        "rewrite",
        "routing",
        "sentiment",
    ]
    for name in folders:
        readme = ROOT / name / "README.md"
        assert readme.is_file(), f"{name} has no README.md"
        assert len(readme.read_text(encoding="utf-8").split()) > 60, f"{name}/README.md is too thin"
        assert f"{name}/" in index, f"datasets/README.md does not index {name}/"


# --- the sentiment set (quickstart) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment() -> dict[str, list[dict[str, Any]]]:
    return {s: load_split("sentiment", s) for s in SPLITS}


def test_sentiment_shape_and_labels(sentiment: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in sentiment.items():
        for i, row in enumerate(rows, 1):
            where = f"sentiment/{split}.jsonl:{i}"
            assert_chat_row(row, ["system", "user", "assistant"], where)
            system, review, label = (m["content"] for m in row["messages"])
            assert system == SENTIMENT_SYSTEM, where
            assert label in SENTIMENT_LABELS, f"{where}: label {label!r}"
            # 1-4 sentences: count sentence ends, allowing a final one without punctuation.
            ends = len(re.findall(r"[.!?](?:\s|$)", review))
            assert 1 <= max(ends, 1) <= 4, f"{where}: {ends} sentences"


def test_sentiment_sizes_and_balance(sentiment: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in sentiment.items():
        lo, hi = GALLERY_SIZES["sentiment"][split]
        assert lo <= len(rows) <= hi, f"{split}: {len(rows)} rows"
        counts = Counter(r["messages"][2]["content"] for r in rows)
        assert set(counts) == SENTIMENT_LABELS, f"{split}: {counts}"
        # Roughly balanced: no class below 28% or above 40% of a split.
        for label, n in counts.items():
            share = n / len(rows)
            assert 0.28 <= share <= 0.40, f"{split}: {label} is {share:.0%} of the split"


def test_sentiment_lengths_vary(sentiment: dict[str, list[dict[str, Any]]]) -> None:
    lengths = [len(r["messages"][1]["content"].split()) for rows in sentiment.values() for r in rows]
    assert min(lengths) <= 5 and max(lengths) >= 25, (min(lengths), max(lengths))
    assert statistics.pstdev(lengths) > 3
    # Varied vocabulary: the reviews are not a handful of templates.
    vocab = {w for rows in sentiment.values() for r in rows for w in words(r["messages"][1]["content"])}
    assert len(vocab) > 2000


def test_sentiment_splits_disjoint(sentiment: dict[str, list[dict[str, Any]]]) -> None:
    assert_splits_clean(sentiment, "sentiment")


# --- the routing set (bench/time_to_quality.py) ---------------------------------------------------


@pytest.fixture(scope="module")
def routing() -> dict[str, list[dict[str, Any]]]:
    return {s: load_split("routing", s) for s in SPLITS}


def test_routing_shape_and_labels(routing: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in routing.items():
        for i, row in enumerate(rows, 1):
            where = f"routing/{split}.jsonl:{i}"
            assert_chat_row(row, ["system", "user", "assistant"], where)
            system, message, label = (m["content"] for m in row["messages"])
            assert system == ROUTING_SYSTEM, where
            assert label in ROUTING_LABELS, f"{where}: label {label!r}"
            assert "\n" not in message, f"{where}: one message a line, no line breaks"


def test_routing_sizes_and_exact_balance(routing: dict[str, list[dict[str, Any]]]) -> None:
    minimum = {"train": 300, "validation": 50, "test": 150}  # the floor
    for split, rows in routing.items():
        assert len(rows) >= minimum[split], f"{split}: {len(rows)} rows"
        counts = Counter(r["messages"][2]["content"] for r in rows)
        # Exactly balanced: accuracy then weighs every team alike, and a model that favours one
        # team cannot reach the 95% target by the class prior.
        assert counts == Counter({label: len(rows) // 5 for label in ROUTING_LABELS}), f"{split}: {counts}"


def test_routing_splits_disjoint(routing: dict[str, list[dict[str, Any]]]) -> None:
    assert_splits_clean(routing, "routing")
    # The same message twice with different labels would slip past the row check above.
    texts = Counter(user_text(r).lower() for rows in routing.values() for r in rows)
    repeated = [t for t, n in texts.items() if n > 1]
    assert not repeated, f"messages repeated: {repeated[:2]}"


def test_routing_lengths_tone_and_variety(routing: dict[str, list[dict[str, Any]]]) -> None:
    messages = [user_text(r) for rows in routing.values() for r in rows]
    lengths = [len(m.split()) for m in messages]
    # One line to a short paragraph.
    assert min(lengths) <= 3 and max(lengths) >= 60, (min(lengths), max(lengths))
    assert statistics.pstdev(lengths) > 6
    assert sum(n <= 6 for n in lengths) >= 10 and sum(n >= 45 for n in lengths) >= 10
    vocab = {w for m in messages for w in words(m)}
    assert len(vocab) > 1500
    # Casual customers too: some messages are written all in lower case.
    assert sum(m == m.lower() for m in messages) >= 25


def test_routing_wording_overlaps_across_teams(routing: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in routing.items():
        crossing = 0
        for row in rows:
            text, label = user_text(row).lower(), row["messages"][2]["content"]
            others = {team for team, pattern in ROUTING_KEYWORDS.items() if re.search(pattern, text)}
            crossing += bool(others - {label})
        share = crossing / len(rows)
        assert share >= 0.25, f"routing/{split}: only {share:.0%} of messages mention another team's subject"


# --- the gallery: extraction, qa, rewrite ---------------------------------------------------------


@pytest.mark.parametrize("name", ["extraction", "qa", "rewrite"])
def test_gallery_shape_sizes_and_splits(name: str) -> None:
    splits = {s: load_split(name, s) for s in SPLITS}
    for split, rows in splits.items():
        lo, hi = GALLERY_SIZES[name][split]
        assert lo <= len(rows) <= hi, f"{name}/{split}: {len(rows)} rows"
        systems = set()
        for i, row in enumerate(rows, 1):
            assert_chat_row(row, ["system", "user", "assistant"], f"{name}/{split}.jsonl:{i}")
            systems.add(row["messages"][0]["content"])
        # One instruction per task kind (extraction has two: orders and job ads).
        assert len(systems) == (2 if name == "extraction" else 1), f"{name}/{split}: {len(systems)} prompts"
    assert_splits_clean(splits, name)


def test_extraction_answers_are_compact_json_with_fixed_keys() -> None:
    for split in SPLITS:
        for i, row in enumerate(load_split("extraction", split), 1):
            where = f"extraction/{split}.jsonl:{i}"
            system, text, answer = (m["content"] for m in row["messages"])
            try:
                obj = json.loads(answer)
            except json.JSONDecodeError as e:
                pytest.fail(f"{where}: answer is not JSON: {e}")
            compact = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            assert answer == compact, f"{where}: not compact JSON"
            if "order" in system.split(".")[0]:
                assert list(obj) == ORDER_KEYS, f"{where}: keys {list(obj)}"
                assert isinstance(obj["quantity"], int) and obj["quantity"] > 0, where
                # The name may be re-capitalised ("priya" -> "Priya"); otherwise it is copied.
                assert obj["name"].lower() in text.lower(), f"{where}: name not in the email"
                if obj["date"] is not None:
                    date.fromisoformat(obj["date"])  # raises on anything but YYYY-MM-DD
            else:
                assert list(obj) == JOB_KEYS, f"{where}: keys {list(obj)}"
                assert obj["remote"] in (True, False, None), where
                for key in ("title", "company", "location", "salary"):
                    # Copied spans: the value must appear in the ad as written.
                    value = obj[key]
                    assert value is None or value.lower() in text.lower(), f"{where}: {key}={value!r}"


def test_qa_answers_are_spans_of_the_context() -> None:
    for split in SPLITS:
        for i, row in enumerate(load_split("qa", split), 1):
            user, answer = row["messages"][1]["content"], row["messages"][2]["content"]
            assert user.startswith("Context: ") and "\n\nQuestion: " in user, f"qa/{split}.jsonl:{i}"
            context = user.split("\n\nQuestion: ")[0]
            assert answer in context, f"qa/{split}.jsonl:{i}: {answer!r} is not a span of the context"
            assert len(answer.split()) <= 10, f"qa/{split}.jsonl:{i}: answer too long"


def test_rewrite_outputs_are_longer_and_formal() -> None:
    informal = re.compile(r"\b(u|ur|pls|thx|lol|gonna|wanna|gimme|tmrw|asap|rn|btw|dude|yo)\b", re.I)
    for split in SPLITS:
        for i, row in enumerate(load_split("rewrite", split), 1):
            out = row["messages"][2]["content"]
            assert not informal.search(out), f"rewrite/{split}.jsonl:{i}: informal word in {out!r}"
            assert out[0].isupper() and out[-1] in ".?!", f"rewrite/{split}.jsonl:{i}: {out!r}"


# --- the throughput benchmark chat set ------------------------------------------------------------


def test_chat_bench_shape_and_length_spread() -> None:
    rows = read_jsonl(ROOT / "chat_bench" / "train.jsonl")
    assert len(rows) == 96
    for i, row in enumerate(rows, 1):
        assert_chat_row(row, ["user", "assistant"], f"chat_bench/train.jsonl:{i}")
    assert_splits_clean({"train": rows}, "chat_bench")
    prompt = [len(r["messages"][0]["content"].split()) for r in rows]
    answer = [len(r["messages"][1]["content"].split()) for r in rows]
    # Words as a proxy for tokens (about 1.3-1.5 tokens a word for SmolLM2's tokenizer):
    # prompts ~10-400 tokens, answers ~5-300 tokens.
    assert 7 <= min(prompt) and max(prompt) <= 300, (min(prompt), max(prompt))
    assert 5 <= min(answer) and max(answer) <= 225, (min(answer), max(answer))

    def count(xs: list[int], lo: int, hi: int) -> int:
        return sum(lo <= x < hi for x in xs)

    # Spread over the range, not all short: every band holds a real share of the set.
    assert count(prompt, 0, 30) >= 15 and count(prompt, 30, 100) >= 15
    assert count(prompt, 100, 180) >= 15 and count(prompt, 180, 301) >= 10
    assert count(answer, 0, 40) >= 15 and count(answer, 40, 100) >= 15
    assert count(answer, 100, 160) >= 15 and count(answer, 160, 226) >= 15


# --- forgetting reference text and the preference toy set -----------------------------------------


def test_reference_text_is_long_prose() -> None:
    text = (ROOT / "reference" / "general_english.txt").read_text(encoding="utf-8")
    n = len(text.split())
    assert 2700 <= n <= 3500, n
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 12
    # Prose, not lists or markup.
    assert not re.search(r"^\s*([-*#]|\d+\.)\s", text, re.M)
    assert len(set(words(text))) > 1200


def test_preference_rows() -> None:
    rows = {s: read_jsonl(ROOT / "preference" / f"{s}.jsonl") for s in ("train", "test")}
    assert 50 <= sum(len(r) for r in rows.values()) <= 70
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows, 1):
            where = f"preference/{split}.jsonl:{i}"
            assert set(row) == {"prompt", "chosen", "rejected"}, where
            assert [m["role"] for m in row["prompt"]] == ["user"], where
            assert [m["role"] for m in row["chosen"]] == ["assistant"], where
            assert [m["role"] for m in row["rejected"]] == ["assistant"], where
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen.strip() and rejected.strip() and chosen != rejected, where
    assert_splits_clean(rows, "preference")
