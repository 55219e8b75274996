"""Stored chat completions and feedback (issue 27, sections 1-2): the official `openai` SDK against a
real `tunery serve` on loopback, on SQLite and on PostgreSQL, plus `tunery logs` and the retention
sweeper. One server per module serves most tests; `--store always` and retention start their own, and
`--store off` and PostgreSQL run the app in process."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from typer.testing import CliRunner

from tests.helpers.server import running_server
from tunery.errors import TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import Base, now
from tunery.serve.common import Settings
from tunery.serve.completions_store import TABLES, CompletionLog, Query, StoredCompletion

ASK = [{"role": "user", "content": "Say hi"}]


def _keys(data_dir: Path, *names: str) -> list[str]:
    store = Store(data_dir)
    try:
        return [store.create_key(name)[1] for name in names]
    finally:
        store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("store")
    with running_server(root / "data") as server:
        alice, bob = _keys(server.data_dir, "alice", "bob")  # two ordinary keys: neither is an admin
        yield SimpleNamespace(
            server=server,
            model=str(tiny_llama),
            alice=server.client(alice),
            bob=server.client(bob),
            bob_key=bob,
        )


def _chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=kw.pop("messages", ASK), max_tokens=4, **kw)


def _feedback(client, **body) -> dict:
    """The SDK has no method for Tunery's extension; its generic `post` raises on errors all the same."""
    return client.post("/tunery/feedback", body=body, cast_to=httpx.Response).json()


def _raw_feedback(client, **body) -> httpx.Response:
    """The same request without the SDK, to look at an error's status and body."""
    headers = {"Authorization": f"Bearer {client.api_key}"}
    return httpx.post(f"{client.base_url}tunery/feedback", json=body, headers=headers)


def test_store_retrieve_messages_update_delete(env):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Count to three."},
    ]
    made = _chat(env.alice, env.model, messages=messages, store=True, metadata={"topic": "greeting"})
    got = env.alice.chat.completions.retrieve(made.id)
    assert got.id == made.id and got.object == "chat.completion" and got.model == env.model
    assert got.choices[0].message.content == made.choices[0].message.content
    assert got.usage.total_tokens == made.usage.total_tokens > 0
    assert got.metadata == {"topic": "greeting"}
    assert got.model_extra["tunery"]["latency_ms"] >= 0 and got.model_extra["tunery"]["feedback"] is None

    listed = list(env.alice.chat.completions.messages.list(made.id, limit=1))  # the SDK pages: 4 pages
    assert [m.role for m in listed] == ["system", "user", "assistant", "user"]
    assert listed[1].content == "Hello there" and listed[1].content_parts[0].text == "Hello "
    assert listed[3].content == "Count to three." and len({m.id for m in listed}) == 4
    newest_first = env.alice.chat.completions.messages.list(made.id, order="desc", limit=2)
    assert [m.content for m in newest_first.data] == ["Count to three.", "Hi."] and newest_first.has_more

    updated = env.alice.chat.completions.update(made.id, metadata={"topic": "counting", "reviewed": "yes"})
    assert updated.metadata == {"topic": "counting", "reviewed": "yes"}
    assert env.alice.chat.completions.retrieve(made.id).metadata == updated.metadata
    assert made.id not in _ids(env.alice, metadata={"topic": "greeting"})  # the old pair is gone
    assert made.id in _ids(env.alice, metadata={"topic": "counting"})

    deleted = env.alice.chat.completions.delete(made.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (made.id, "chat.completion.deleted", True)
    with pytest.raises(openai.NotFoundError):
        env.alice.chat.completions.retrieve(made.id)
    assert made.id not in _ids(env.alice)


def _ids(client, **kw) -> list[str]:
    return [c.id for c in client.chat.completions.list(**kw)]


def test_only_requests_with_store_true_are_stored_by_default(env):
    plain = _chat(env.alice, env.model)
    with pytest.raises(openai.NotFoundError):
        env.alice.chat.completions.retrieve(plain.id)
    assert plain.id not in _ids(env.alice)


def test_list_filters_pages_and_orders(env):
    tag = {"batch": f"b{time.time_ns()}"}
    made = [_chat(env.alice, env.model, store=True, metadata={**tag, "i": str(i)}).id for i in range(3)]
    assert _ids(env.alice, metadata=tag, limit=1) == made  # auto-paged, oldest first (OpenAI's default)
    assert _ids(env.alice, metadata={**tag, "i": "1"}) == [made[1]]
    assert _ids(env.alice, metadata={**tag, "i": "9"}) == []
    first = env.alice.chat.completions.list(metadata=tag, order="desc", limit=2)
    assert [c.id for c in first.data] == made[:0:-1] and first.has_more
    raw = env.alice.get(
        "/chat/completions",
        options={"params": {"metadata[batch]": tag["batch"], "limit": 2}},
        cast_to=httpx.Response,
    ).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == (
        "list",
        made[0],
        made[1],
        True,
    )
    assert _ids(env.alice, metadata=tag, after=made[0]) == made[1:]
    assert _ids(env.alice, metadata=tag, model=env.model) == made
    assert _ids(env.alice, metadata=tag, model="some-other-model") == []


def test_streamed_completion_is_stored_assembled(env):
    stream = _chat(env.alice, env.model, store=True, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    got = env.alice.chat.completions.retrieve(chunks[0].id)
    assert got.choices[0].message.content == text and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_tools_are_kept_with_the_request(env):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    made = _chat(env.alice, env.model, store=True, tools=tools)
    log = CompletionLog(Store(env.server.data_dir))
    try:
        row = log.get(None, made.id)
    finally:
        log.store.close()
    assert row.request["tools"] == tools and row.request["max_tokens"] == 4
    assert row.owner != "key_local" and row.latency_ms >= 0


def test_another_key_cannot_see_or_change_a_stored_completion(env):
    """Bob holds Alice's completion id (ids leak: logs, screenshots) and tries every endpoint."""
    made = _chat(env.alice, env.model, store=True, metadata={"owner": "alice"})
    bob = env.bob
    for attempt in (
        lambda: bob.chat.completions.retrieve(made.id),
        lambda: bob.chat.completions.update(made.id, metadata={"owner": "bob"}),
        lambda: bob.chat.completions.delete(made.id),
        lambda: bob.chat.completions.messages.list(made.id),
        lambda: _feedback(bob, completion_id=made.id, rating="down"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert made.id in caught.value.message and "/" not in caught.value.body["message"].replace(
            made.id, ""
        )
    assert made.id not in _ids(bob) and _ids(bob, metadata={"owner": "alice"}) == []
    assert made.id not in _ids(bob, after=made.id)
    mine = _chat(bob, env.model, store=True)
    assert mine.id in _ids(bob) and mine.id not in _ids(env.alice)
    # Alice's row came through untouched.
    got = env.alice.chat.completions.retrieve(made.id)
    assert got.metadata == {"owner": "alice"} and got.model_extra["tunery"]["feedback"] is None


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
        ["k", "v"],
        {"k": "a\x00b"},
    ],
    ids=["17-pairs", "long-key", "long-value", "not-a-string", "not-an-object", "nul"],
)
def test_metadata_limits_are_400(env, metadata):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(env.alice, env.model, store=True, metadata=metadata)
    assert caught.value.body["param"] == "metadata" and caught.value.body["type"] == "invalid_request_error"
    made = _chat(env.alice, env.model, store=True)
    with pytest.raises(openai.BadRequestError):
        env.alice.chat.completions.update(made.id, metadata=metadata)


def test_metadata_at_the_limits_is_accepted(env):
    most = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    made = _chat(env.alice, env.model, store=True, metadata=most)
    assert env.alice.chat.completions.retrieve(made.id).metadata == most


def test_store_must_be_a_boolean(env):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(env.alice, env.model, extra_body={"store": "yes"})
    assert caught.value.body["param"] == "store"


def test_feedback_is_recorded_replaced_and_shown(env):
    made = _chat(env.alice, env.model, store=True)
    fb = _feedback(env.alice, completion_id=made.id, rating="up")
    assert (fb["object"], fb["completion_id"], fb["rating"], fb["corrected"]) == (
        "tunery.feedback",
        made.id,
        "up",
        None,
    )
    assert env.alice.chat.completions.retrieve(made.id).model_extra["tunery"]["feedback"]["rating"] == "up"
    _feedback(env.alice, completion_id=made.id, rating=2, corrected="Hello!", note="too terse")
    shown = env.alice.chat.completions.retrieve(made.id).model_extra["tunery"]["feedback"]
    assert (shown["rating"], shown["corrected"], shown["note"]) == (2, "Hello!", "too terse")
    listed = [c for c in env.alice.chat.completions.list() if c.id == made.id][0]
    assert listed.model_extra["tunery"]["feedback"]["corrected"] == "Hello!"


@pytest.mark.parametrize(
    "body",
    [
        {"rating": "meh"},
        {"rating": 0},
        {"rating": 6},
        {"rating": True},
        {"rating": 4.0},
        {},
        {"rating": "up", "corrected": 5},
        {"rating": "up", "note": "x" * 4097},
        {"rating": "up", "corrected": "a\x00b"},
    ],
)
def test_bad_feedback_is_400(env, body):
    made = _chat(env.alice, env.model, store=True)
    r = _raw_feedback(env.alice, completion_id=made.id, **body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert env.alice.chat.completions.retrieve(made.id).model_extra["tunery"]["feedback"] is None


def test_feedback_on_a_missing_completion_is_404(env):
    r = _raw_feedback(env.alice, completion_id="chatcmpl-nope", rating="up")
    assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id"


def test_logs_cli_lists_shows_rates_and_exports(env, tmp_path):
    from tunery.cli import app

    made = _chat(
        env.alice,
        env.model,
        store=True,
        metadata={"cli": "yes"},
        messages=[{"role": "user", "content": "cli prompt"}],
    )
    data = ["--data-dir", str(env.server.data_dir)]
    runner = CliRunner()
    listed = runner.invoke(app, ["logs", "list", "--limit", "1000", *data], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert made.id in listed.output and "alice" in listed.output and "cli prompt" in listed.output

    shown = runner.invoke(app, ["logs", "show", made.id, *data])
    assert shown.exit_code == 0 and json.loads(shown.output)["metadata"] == {"cli": "yes"}

    rated = runner.invoke(app, ["logs", "rate", made.id, "--rating", "down", "--corrected", "Fixed.", *data])
    assert rated.exit_code == 0, rated.output
    fb = env.alice.chat.completions.retrieve(made.id).model_extra["tunery"]["feedback"]
    assert (fb["rating"], fb["corrected"]) == ("down", "Fixed.")  # the server reads what the CLI wrote

    out = tmp_path / "rated.jsonl"
    exported = runner.invoke(app, ["logs", "export", "--out", str(out), "--rated", *data])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert made.id in [r["id"] for r in lines] and all(r["feedback"] for r in lines)
    mine = next(r for r in lines if r["id"] == made.id)
    assert mine["request"]["messages"] == [{"role": "user", "content": "cli prompt"}]
    assert mine["response"]["choices"][0]["message"]["content"] == made.choices[0].message.content

    bad = runner.invoke(app, ["logs", "rate", made.id, "--rating", "7", *data])
    missing = runner.invoke(app, ["logs", "show", "chatcmpl-nope", *data])
    assert bad.exit_code == 2 and missing.exit_code == 2 and "Traceback" not in bad.output + missing.output


def test_store_off_accepts_store_true_but_keeps_nothing(tmp_path, tiny_llama):
    with _in_process(tmp_path, store_mode="off") as client:
        made = _chat(client, str(tiny_llama), store=True, metadata={"k": "v"})
        assert made.choices[0].message.content is not None
        assert _ids(client) == []
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(made.id)
        with pytest.raises(openai.BadRequestError):  # metadata is still checked
            _chat(client, str(tiny_llama), store=True, metadata={"k": 1})
    with pytest.raises(TuneryError, match="use off, request or always"):
        Settings(data_dir=tmp_path / "data", store_mode="sometimes")


@contextmanager
def _in_process(tmp_path: Path, **settings):
    """The SDK over FastAPI's test client, for the variants that need a server of their own: a
    third server process would cost seconds of start-up and model loading."""
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    full = Settings(
        data_dir=tmp_path / "data", api_key="k", run_executor=False, allow_local_models=True, **settings
    )
    with TestClient(create_app(full)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)


def _seed(log: CompletionLog, owner: str, n: int, age_s: int = 0, tag: str = "seed") -> list[str]:
    ids = []
    for i in range(n):
        cid = f"chatcmpl-{tag}{i}-{time.time_ns()}"
        response = {
            "id": cid,
            "object": "chat.completion",
            "created": now() - age_s,
            "model": "m",
            "choices": [],
        }
        log.add(
            StoredCompletion(
                id=cid,
                owner=owner,
                model="m",
                created_at=now() - age_s,
                request={"messages": ASK},
                response=response,
                meta={"tag": tag},
                latency_ms=1,
            )
        )
        ids.append(cid)
    return ids


@pytest.mark.slow  # heavy for the developer loop: a server restarted with the sweeper
def test_store_always_and_the_retention_sweeper(tmp_path, tiny_llama):
    """Rows older than --store-max-age-days and beyond --store-max-rows go at the server's start."""
    data = tmp_path / "data"
    data.mkdir()
    (key,) = _keys(data, "alice")
    log = CompletionLog(Store(data))
    owner = log.store.key_for(key).id
    old = _seed(log, owner, 2, age_s=3 * 86400, tag="old")
    fresh = _seed(log, owner, 5, tag="fresh")
    log.rate(owner, old[0], "up")
    log.store.close()
    args = ("--store", "always", "--store-max-age-days", "2", "--store-max-rows", "3")
    with running_server(data, None, *args) as server:
        client = server.client(key)
        assert _ids(client) == fresh[2:]  # both old rows by age, then the two oldest fresh by count
        made = _chat(client, str(tiny_llama))  # no store: true, stored all the same
        assert client.chat.completions.retrieve(made.id).id == made.id
    log = CompletionLog(Store(data))
    try:
        with log.store.tx() as s:  # the swept rows' feedback and metadata went with them
            from tunery.serve.completions_store import CompletionMetadata, Feedback

            assert s.get(Feedback, old[0]) is None
            assert s.query(CompletionMetadata).filter(CompletionMetadata.completion_id.in_(old)).count() == 0
    finally:
        log.store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def log(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    store = Store(tmp_path / "data", url)
    if url:  # one cluster serves the whole session: start from empty tables
        Base.metadata.drop_all(store.engine, tables=TABLES)
    yield CompletionLog(store)
    store.close()


def test_sweep_by_age_and_by_count(log):
    owner = f"key_{time.time_ns()}"
    log.sweep(None, None)  # no limits: nothing to do
    old = _seed(log, owner, 3, age_s=10 * 86400, tag="old")
    fresh = _seed(log, owner, 4, tag="fresh")
    log.rate(owner, old[0], 3)
    assert log.sweep(5 * 86400, None) >= 3
    assert [r.id for r in log.page(Query(owner))[0]] == fresh
    log.sweep(None, 2)  # the whole table (every key) is capped; the newest rows stay
    rows, more = log.page(Query(None), limit=10)
    assert [r.id for r in rows] == fresh[2:] and not more
    assert log.feedback(old) == {}


def test_metadata_filter_with_any_key(log):
    """Keys with quotes, dots, backslashes and non-ASCII characters filter exactly (a JSON-path
    filter would not) on both databases."""
    owner = f"key_{time.time_ns()}"
    keys = ['we"ird', "a.b", "back\\slash", "ü", "$[0]", "x'y"]
    ids = {}
    for k in keys:
        (cid,) = _seed(log, owner, 1, tag=f"m{len(ids)}")
        log.set_metadata(owner, cid, {k: "v", "n": str(len(ids))})
        ids[k] = cid
    for k in keys:
        assert [r.id for r in log.page(Query(owner, metadata={k: "v"}))[0]] == [ids[k]], k
    assert log.page(Query(owner, metadata={"a.b": "v", "n": "0"}))[0] == []
    assert log.page(Query(f"{owner}-other", metadata={"a.b": "v"}))[0] == []


def test_sdk_round_trip_on_postgres(postgres_url, tmp_path, tiny_llama):
    with _in_process(tmp_path, database_url=postgres_url) as client:
        tag = {"run": str(time.time_ns())}
        made = _chat(client, str(tiny_llama), store=True, metadata=tag)
        assert _ids(client, metadata=tag) == [made.id]
        assert client.chat.completions.retrieve(made.id).metadata == tag
        assert [m.content for m in client.chat.completions.messages.list(made.id)] == ["Say hi"]
        assert client.chat.completions.update(made.id, metadata={"run": "x"}).metadata == {"run": "x"}
        assert _feedback(client, completion_id=made.id, rating=5)["rating"] == 5
        assert client.chat.completions.delete(made.id).deleted
        assert _ids(client, metadata=tag) == []
