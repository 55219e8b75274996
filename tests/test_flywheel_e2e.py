"""The data flywheel end to end (issue 27, "Proof"): the official `openai` SDK against a real `tunery
serve` on loopback, one ordinary key, the tiny model. Traffic is stored (`store: true`), reviewed (up,
down, corrected), turned into a dataset, fine-tuned from the model that served it, compared with it on
the held-out slice, and the key's alias is switched from the old model to the new one.

Every count that the loop makes deterministic is asserted exactly: which completions the dataset keeps
and drops and why, the train and test rows themselves, the job's steps, the comparison's examples, and
what the alias serves before and after the switch. Whether the tiny random model got better is not."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import make_lora_adapter, register_model, running_server
from tunery.jobs.store import Store

OLD = "ft:tiny:alice:support:v1"  # the model in production: a fine-tuned model the key owns
SYSTEM = {"role": "system", "content": "Route the ticket: billing, shipping, technical, account or sales."}
UP, DOWN = "up", "down"
# The simulated traffic, in the order it arrives: (ticket, review). A review is a rating, or a rating
# and the reply it should have been (a correction); None leaves the reply unrated.
TRAFFIC: list[tuple[str, tuple | None]] = [
    ("My parcel is a week late.", (UP,)),
    ("I was charged twice this month.", (DOWN, "billing")),
    ("The app crashes when I open it.", (UP,)),
    ("my parcel is   a week LATE.", (UP,)),  # the first ticket again: the later reply wins
    ("I forgot my password.", (DOWN, "account")),
    ("Do you offer a discount for schools?", (5,)),
    ("Where is my refund?", (DOWN, "billing")),
    ("The tracking page shows nothing.", (UP,)),
    ("Can I change my email address?", (DOWN,)),  # rejected and not corrected: dropped
    ("The firmware update failed.", (2, "technical")),
    ("How much is the premium plan?", (4,)),
    ("Someone logged into my account.", None),  # never reviewed: dropped
    ("The courier left the box outside.", (UP,)),
    ("My invoice has the wrong address.", (DOWN, "billing")),
    ("The parcel arrived damaged.", (1, "shipping")),
    ("I was billed after I cancelled.", (DOWN, "billing")),
]
TEST_FRACTION = 0.25  # 13 examples: the 3 newest are held out, 10 train (a job needs at least ten)
EXPECTED_REPORT = {
    "shape": "sft",
    "completions": 16,
    "examples": 13,
    "train": 10,
    "test": 3,
    "kept": {"accepted": 6, "corrected": 7},
    "dropped": {"duplicate prompt": 1, "rated down": 1, "unrated": 1},
}
TERMINAL = ("succeeded", "failed", "cancelled")


def _ordinary_key(data: Path) -> str:
    store = Store(data)
    try:
        row, key = store.create_key("alice")
        assert not row.is_admin
        return key
    finally:
        store.close()


def _post(client, path: str, body: dict) -> dict:
    """Tunery's extension endpoints through the SDK's generic `post` (it raises on errors)."""
    return client.post(path, body=body, cast_to=httpx.Response).json()


def _get(client, path: str) -> dict:
    return client.get(path, cast_to=httpx.Response).json()


def _ask(client, model: str, text: str, **kw):
    messages = [SYSTEM, {"role": "user", "content": text}]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, **kw)


def _traffic(client) -> list:
    """Step 1: every ticket through the served model, stored; returns the completions in order."""
    made = [_ask(client, OLD, ticket, store=True, metadata={"app": "router"}) for ticket, _ in TRAFFIC]
    assert all(m.model == OLD and m.choices[0].message.content.strip() for m in made)
    assert len({m.id for m in made}) == len(TRAFFIC)
    stored = list(client.chat.completions.list(metadata={"app": "router"}, limit=5))  # several pages
    assert [c.id for c in stored] == [m.id for m in made]
    return made


def _review(client, made: list) -> None:
    """Step 2: rate and correct the replies through the feedback endpoint."""
    for completion, (_, review) in zip(made, TRAFFIC, strict=True):
        if review is None:
            continue
        body = {"completion_id": completion.id, "rating": review[0]}
        if len(review) > 1:
            body["corrected"] = review[1]
        fb = _post(client, "/tunery/feedback", body)
        assert (fb["object"], fb["completion_id"], fb["rating"]) == (
            "tunery.feedback",
            completion.id,
            review[0],
        )
        assert fb["corrected"] == (review[1] if len(review) > 1 else None)
    rated = [
        c
        for c in client.chat.completions.list(metadata={"app": "router"})
        if c.model_extra["tunery"]["feedback"]
    ]
    assert len(rated) == sum(review is not None for _, review in TRAFFIC)


def _expected_rows(made: list) -> list[dict]:
    """The SFT rows the reviews make, oldest first: the correction in place of a corrected reply, the
    reply itself where it was accepted, the later of two near-identical tickets."""
    rows = {}
    for completion, (ticket, review) in zip(made, TRAFFIC, strict=True):
        good = review is not None and (len(review) > 1 or review[0] in (UP, 4, 5))
        if good:
            reply = review[1] if len(review) > 1 else completion.choices[0].message.content
            key = " ".join(ticket.lower().split())
            rows.pop(key, None)
            rows[key] = {
                "messages": [
                    SYSTEM,
                    {"role": "user", "content": ticket},
                    {"role": "assistant", "content": reply},
                ]
            }
    return list(rows.values())


def _rows(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _dataset(client, made: list) -> dict:
    """Step 3: the dataset from the logs, its report, and the rows in its train and test files."""
    body = {"model": OLD, "metadata": {"app": "router"}, "shape": "sft", "test_fraction": TEST_FRACTION}
    built = _post(client, "/tunery/datasets", body)
    assert (built["object"], built["purpose"], built["filename"]) == (
        "file",
        "fine-tune",
        "from-logs-sft.jsonl",
    )
    assert built["tunery"]["report"] == EXPECTED_REPORT
    test_file = built["tunery"]["test_file"]
    assert (test_file["purpose"], test_file["filename"]) == ("fine-tune", "from-logs-sft.test.jsonl")
    assert client.files.retrieve(built["id"]).bytes == built["bytes"] > 0
    expected = _expected_rows(made)
    assert len(expected) == EXPECTED_REPORT["examples"]
    # Train rows may swap places where two completions share a second; the test slice is the newest three.
    train = _rows(client, built["id"])
    assert sorted(map(json.dumps, train)) == sorted(map(json.dumps, expected[:10]))
    test = _rows(client, test_file["id"])
    assert test == expected[10:]
    assert [r["messages"][-1]["content"] for r in test] == ["billing", "shipping", "billing"]
    return built


def _fine_tune(client, file_id: str, server) -> str:
    """Step 4: a job that continues the served model on the dataset, followed until it ends."""
    job = client.fine_tuning.jobs.create(
        model=OLD,
        training_file=file_id,
        suffix="flywheel",
        seed=7,
        # Ten steps; a high learning rate so the new model's greedy replies visibly differ (step 6).
        hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 10},
    )
    assert job.status == "queued" and job.model == OLD
    deadline = time.time() + 240
    while job.status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", (job.status, job.error, server.log()[-3000:])
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert sum(m.startswith("Step ") for m in messages) == 10 and any(
        m.startswith("Step 10/10:") for m in messages
    )
    new = job.fine_tuned_model
    assert new.startswith("ft:") and new.split(":")[2:4] == ["alice", "flywheel"] and new != OLD
    assert {m.id for m in client.models.list()} >= {OLD, new}
    return new


def _compare(client, test_file_id: str, new: str) -> dict:
    """Step 5: old against new on the held-out slice."""
    body = {"file": test_file_id, "models": [OLD, new], "max_new_tokens": 3}
    result = _post(client, "/tunery/compare", body)
    assert (result["n"], result["skipped"], result["task"]) == (3, 0, "classification")
    assert [r["label"] for r in result["models"]] == [OLD, new]
    for row in result["models"]:
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["accuracy"] <= 1 and 0 <= row["invalid"] <= 3
        assert row["latency_ms"]["p50"] >= 0 and row["completion_tokens"]["mean"] <= 3
    old_tokens, new_tokens = (r["prompt_tokens"] for r in result["models"])
    assert old_tokens == new_tokens and old_tokens["mean"] > 0  # one base, one chat template
    assert result["n_disagreements"] == len(result["disagreements"]) <= 3
    for item in result["disagreements"]:
        assert set(item["replies"]) == {OLD, new} and item["reference"] in ("billing", "shipping")
    return result


def _switch_alias(client, new: str) -> None:
    """Step 6: the app calls a stable name; switching it moves the app to the new model."""
    ticket = TRAFFIC[-1][0]
    old_reply = _ask(client, OLD, ticket).choices[0].message.content
    new_reply = _ask(client, new, ticket).choices[0].message.content
    assert old_reply != new_reply  # the training changed the greedy reply: what the alias serves shows
    made = _post(client, "/tunery/aliases/router", {"model": OLD})
    assert (made["model"], made["previous_model"]) == (OLD, None)
    via = _ask(client, "router", ticket)
    assert via.model == "router" and via.choices[0].message.content == old_reply
    switched = _post(client, "/tunery/aliases/router", {"model": new})
    assert (switched["model"], switched["previous_model"]) == (new, OLD)
    assert _ask(client, "router", ticket).choices[0].message.content == new_reply
    shown = _get(client, "/tunery/aliases/router")
    assert (shown["model"], shown["previous_model"]) == (new, OLD)
    assert [a["name"] for a in _get(client, "/tunery/aliases")["data"]] == ["router"]


@pytest.mark.slow  # heavy for the developer loop: a server, a training job and a comparison
def test_flywheel_store_review_dataset_train_compare_switch(tmp_path, tiny_llama):
    data = tmp_path / "data"
    key = _ordinary_key(data)
    register_model(data, key, OLD, tiny_llama, make_lora_adapter(tiny_llama, tmp_path / "v1", seed=3))
    with running_server(data) as server:
        client = server.client(key, timeout=300)
        made = _traffic(client)
        _review(client, made)
        built = _dataset(client, made)
        new = _fine_tune(client, built["id"], server)
        _compare(client, built["tunery"]["test_file"]["id"], new)
        _switch_alias(client, new)
    assert server.proc.poll() is not None  # stopped
