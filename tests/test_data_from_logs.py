"""Datasets from stored chat completions (issue 27, section 3) and `tunery jobs get` (section 5).

Most tests write stored completions and feedback straight through the store module (fast); one
module-scoped real server drives the API path: chats with `store: true`, feedback, then
`POST /v1/tunery/datasets` per key, a job from the dataset, and `tunery jobs get`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers.server import running_server
from tunery.cli import app
from tunery.data import from_logs
from tunery.data.validate import validate_file
from tunery.errors import TuneryError
from tunery.jobs.store import Store
from tunery.objectives import validation_kind
from tunery.serve.completions_store import CompletionLog, Query, StoredCompletion

OWNER, OTHER = "key_alice", "key_bob"


def _add(logs, n, prompt, reply, t, rating=None, corrected=None, owner=OWNER, model="m", meta=None):
    logs.add(
        StoredCompletion(
            id=f"chatcmpl-{owner}-{n}",
            owner=owner,
            model=model,
            created_at=t,
            request={"messages": [{"role": "user", "content": prompt}]},
            response={"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]},
            meta=meta,
            latency_ms=5,
        )
    )
    if rating is not None:
        logs.rate(owner, f"chatcmpl-{owner}-{n}", rating, corrected)


@pytest.fixture
def logs(tmp_path):
    """Eight rated and unrated completions of one key (see the counts in each test), plus one of
    another key that must never show up."""
    log = CompletionLog(Store(tmp_path / "data"))
    _add(log, 1, "Hello", "hi", 100, "up")
    _add(log, 2, "What is 2+2?", "5", 200, "down", corrected="4")
    _add(log, 3, "Capital of France?", "Paris", 300, 5)
    _add(log, 4, "capital  of FRANCE? ", "Lyon", 400, "down")  # near-duplicate of 3
    _add(log, 5, "Tell a joke", "no", 500)  # unrated
    _add(log, 6, "  hello", "hey there", 600, 4)  # near-duplicate of 1, later
    _add(log, 7, "Summarise", "ok", 700, 3)  # neutral score
    _add(log, 8, "Translate cat", "gato", 800, "up", meta={"team": "es"})
    _add(log, 1, "Secret of bob", "bob's reply", 900, "up", owner=OTHER)
    yield log
    log.store.close()


def _build(log, shape, rating="rated", fraction=0.25, **query):
    return from_logs.build(log.records(Query(OWNER, **query), 1000), shape, rating, fraction)


def test_sft_counts_dedup_and_time_ordered_holdout(logs):
    built = _build(logs, "sft")
    r = built.report.to_dict()
    assert r["completions"] == 8
    assert r["kept"] == {"accepted": 3, "corrected": 1}
    assert r["dropped"] == {"duplicate prompt": 1, "neutral score": 1, "rated down": 1, "unrated": 1}
    # The most recent example is the test slice; the rest, oldest first, are for training.
    assert (r["train"], r["test"]) == (3, 1)
    assert built.test == [
        {"messages": [{"role": "user", "content": "Translate cat"}, {"role": "assistant", "content": "gato"}]}
    ]
    replies = [row["messages"][-1]["content"] for row in built.train]
    assert replies == ["4", "Paris", "hey there"]  # the correction replaces "5"; "hi" lost to the later hello
    assert not any("bob" in json.dumps(row) for row in built.train + built.test)


def test_sft_any_takes_unrated_and_filters_apply(logs):
    assert _build(logs, "sft", "any").report.kept == {"accepted": 3, "corrected": 1, "unrated": 1}
    up = _build(logs, "sft", "up").report.to_dict()
    assert up["kept"] == {"accepted": 3, "corrected": 1}
    assert up["dropped"] == {"duplicate prompt": 1, "not up": 2, "unrated": 1}
    assert _build(logs, "sft", metadata={"team": "es"}).report.kept == {"accepted": 1}
    windowed = _build(logs, "sft", since=250, until=650).report.to_dict()  # rows 3-6
    assert windowed["completions"] == 4 and windowed["kept"] == {"accepted": 2}


def test_dpo_pairs(logs):
    built = _build(logs, "dpo", fraction=0)
    r = built.report.to_dict()
    assert r["kept"] == {"corrected over original": 1, "up over down": 1}
    # hello x2 (both up), summarise (neutral) and translate (up alone) have no pair: 2 + 2 + 4 = 8.
    assert r["dropped"] == {"no pair": 4, "unrated": 1}
    assert built.train[0] == {
        "input": {"messages": [{"role": "user", "content": "What is 2+2?"}]},
        "preferred_output": [{"role": "assistant", "content": "4"}],
        "non_preferred_output": [{"role": "assistant", "content": "5"}],
    }
    assert built.train[1]["preferred_output"][0]["content"] == "Paris"
    assert built.train[1]["non_preferred_output"][0]["content"] == "Lyon"


def test_kto_labels(logs):
    built = _build(logs, "kto", fraction=0)
    r = built.report.to_dict()
    assert r["kept"] == {"corrected": 1, "desirable": 3, "undesirable": 2}
    assert r["dropped"] == {"duplicate prompt": 1, "neutral score": 1, "unrated": 1}
    labels = [(row["completion"][0]["content"], row["label"]) for row in built.train]
    assert labels == [
        ("5", False),
        ("4", True),
        ("Paris", True),
        ("Lyon", False),
        ("hey there", True),
        ("gato", True),
    ]


@pytest.mark.parametrize(("shape", "fraction"), [("sft", "0.25"), ("dpo", "0.5"), ("kto", "0.25")])
def test_cli_writes_files_that_validate(logs, tmp_path, shape, fraction):
    out = tmp_path / f"{shape}.jsonl"
    args = ["data", "from-logs", "--data-dir", str(tmp_path / "data"), "--key", OWNER, "--shape", shape]
    got = CliRunner().invoke(app, [*args, "--test-fraction", fraction, "--output", str(out)])
    assert got.exit_code == 0, got.output
    assert "dropped" in got.output and f"Wrote {out}" in got.output
    test = tmp_path / f"{shape}.test.jsonl"
    method = from_logs.VALIDATE_AS[shape]
    for path in (out, test):
        report = validate_file(path, method=method, kind=validation_kind(method), min_examples=1)
        assert report.ok, report.errors
    assert len(test.read_text().splitlines()) == 1  # the newest of 4 (sft), 2 (dpo) or 6 (kto) examples


def test_relabel_rewrites_uncorrected_train_replies_with_the_teacher(logs, tmp_path, tiny_llama):
    """`--relabel-with`: the teacher's greedy reply replaces every train reply no reviewer wrote;
    corrected replies and the held-out slice stay as reviewed."""
    from tunery.generation.generate import chat_prompt, generate_batch
    from tunery.generation.loading import load_for_inference
    from tunery.generation.sequence import GenerationParams

    out = tmp_path / "sft.jsonl"
    args = [
        "data",
        "from-logs",
        "--data-dir",
        str(tmp_path / "data"),
        "--key",
        OWNER,
        "--test-fraction",
        "0.25",
    ]
    teacher = ["--relabel-with", str(tiny_llama), "--relabel-max-tokens", "5"]
    got = CliRunner().invoke(app, [*args, *teacher, "--output", str(out)])
    assert got.exit_code == 0, got.output
    train = [json.loads(line) for line in out.read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "sft.test.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in test] == ["gato"]  # the newest, as reviewed
    model, tok = load_for_inference(str(tiny_llama))
    params = GenerationParams(max_new_tokens=5, temperature=0.0)
    original = {"hello": "hey there", "Capital of France?": "Paris"}  # the accepted replies
    rewritten = 0
    for row in train:
        prompt, reply = row["messages"][:-1], row["messages"][-1]["content"]
        if prompt[-1]["content"] == "What is 2+2?":
            assert reply == "4"  # the reviewer's correction is kept
            continue
        teacher_says = generate_batch(model, tok, [chat_prompt(tok, prompt)], params)[0].text
        # A blank answer (a random tiny teacher gives some) keeps the accepted reply.
        expected = teacher_says if teacher_says.strip() else original[prompt[-1]["content"].strip()]
        assert reply == expected
        rewritten += bool(teacher_says.strip())
    assert len(train) == 3 and f"relabeled {rewritten} train" in got.output
    bad = CliRunner().invoke(app, [*args, *teacher, "--shape", "dpo", "--output", str(tmp_path / "d.jsonl")])
    assert bad.exit_code != 0 and "--relabel-with applies to --shape sft only" in bad.output


def test_cli_errors_are_clear(logs, tmp_path):
    data = ["--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "x.jsonl")]
    bad = CliRunner().invoke(app, ["data", "from-logs", *data, "--shape", "rlhf"])
    assert bad.exit_code == 2 and "shape must be one of sft, dpo, kto" in bad.output
    when = CliRunner().invoke(app, ["data", "from-logs", *data, "--since", "yesterday"])
    assert when.exit_code == 2 and "--since must be an ISO date" in when.output
    none = CliRunner().invoke(app, ["data", "from-logs", *data, "--model", "nope"])
    assert none.exit_code == 2 and "no stored completion matched" in " ".join(none.output.split())
    assert from_logs.parse_time("1970-01-02", "until", end=True) == 2 * 86400
    with pytest.raises(TuneryError, match="between 0 and 0.5"):
        from_logs.build([], "sft", "rated", 0.9)


# ---------------------------------------------------------------------------------------------
# The API: a real server, real chats, per-key isolation, a job from the dataset, `tunery jobs get`


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama):
    with running_server(tmp_path_factory.mktemp("fromlogs") / "data") as server:
        store = Store(server.data_dir)
        try:
            alice, bob = (store.create_key(name)[1] for name in ("alice", "bob"))
        finally:
            store.close()
        yield SimpleNamespace(server=server, model=str(tiny_llama), alice=alice, bob=bob)


def _post(env, key: str, path: str, body: dict) -> httpx.Response:
    url = f"{env.server.base_url}/{path}"
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_api_dataset_per_key_and_jobs_get(served):
    client = served.server.client(served.alice)
    for i in range(11):  # a job needs ten training examples
        made = client.chat.completions.create(
            model=served.model,
            messages=[{"role": "user", "content": f"Question number {i}"}],
            max_tokens=4,
            store=True,
        )
        rated = _post(
            served,
            served.alice,
            "tunery/feedback",
            {"completion_id": made.id, "rating": "down", "corrected": f"Answer {i}"},
        )
        assert rated.status_code == 200, rated.text
    body = {"shape": "sft", "test_fraction": 0.1, "model": served.model}
    got = _post(served, served.alice, "tunery/datasets", body)
    assert got.status_code == 200, got.text
    made = got.json()
    assert (
        made["object"] == "file"
        and made["purpose"] == "fine-tune"
        and made["filename"] == "from-logs-sft.jsonl"
    )
    assert made["tunery"]["report"]["kept"] == {"corrected": 11}
    assert (made["tunery"]["report"]["train"], made["tunery"]["report"]["test"]) == (10, 1)
    test_file = made["tunery"]["test_file"]
    assert test_file["filename"] == "from-logs-sft.test.jsonl"
    held_out = client.files.content(test_file["id"]).text
    assert json.loads(held_out)["messages"][-1]["content"] == "Answer 10"  # the latest chat

    # Bob's key sees none of Alice's logs: nothing to build from, and no file made.
    other = _post(served, served.bob, "tunery/datasets", {"shape": "sft", "rating": "any"})
    assert other.status_code == 400 and other.json()["error"]["code"] == "empty_dataset"
    assert "none of this key's stored completions match" in other.json()["error"]["message"]
    assert served.server.client(served.bob).files.list().data == []
    bad = _post(served, served.alice, "tunery/datasets", {"shape": "sft", "colour": "red"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "colour"

    conn = ["--base-url", served.server.base_url, "--api-key", served.alice]
    create = ["jobs", "create", "-m", served.model, "-t", made["id"], "--compute-classification-metrics"]
    created = CliRunner().invoke(app, [*create, *conn])
    assert created.exit_code == 0, created.output
    job = client.fine_tuning.jobs.retrieve(created.output.strip().splitlines()[-1])
    shown = CliRunner().invoke(app, ["jobs", "get", job.id, *conn])
    raw = CliRunner().invoke(app, ["jobs", "get", job.id, "--json", *conn])
    client.fine_tuning.jobs.cancel(job.id)
    assert shown.exit_code == 0, shown.output
    assert (
        f"id:               {job.id}" in shown.output and f"model:            {served.model}" in shown.output
    )
    assert "status:" in shown.output and '"n_epochs"' in shown.output
    assert json.loads(raw.output)["id"] == job.id
    assert json.loads(raw.output)["tunery"]["compute_classification_metrics"] is True
    missing = CliRunner().invoke(app, ["jobs", "get", "ftjob-nope", *conn])
    assert missing.exit_code == 2 and "404" in missing.output


def test_holdout_path():
    assert from_logs.holdout_path(Path("out/data.jsonl")) == Path("out/data.test.jsonl")


def test_classification_metrics_through_the_api(tmp_path):
    from types import SimpleNamespace as Row

    from tunery.jobs import spec

    body = {"compute_classification_metrics": True, "tunery": {"classification_positive_class": "yes"}}
    ext = spec.parse_request(body)["tunery"]
    assert ext["compute_classification_metrics"] is True and ext["classification_positive_class"] == "yes"
    job = Row(model="smollm2-135m", tunery=ext, seed=1, run_dir="jobs/x", resume=False, hyperparameters={})
    config = spec.build_config(job, tmp_path, tmp_path / "train.jsonl", tmp_path / "val.jsonl")
    assert config.compute_classification_metrics is True and config.classification_positive_class == "yes"
    with pytest.raises(spec.InvalidRequest) as err:
        spec.parse_request({"tunery": {"compute_classification_metrics": "yes"}})
    assert err.value.param == "compute_classification_metrics"
