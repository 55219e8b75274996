"""Request hardening of `tunery serve` (issue 21): one request's bad input fails only that request,
hyperparameters are checked whichever block they come in, per-key quotas answer 429 naming the
limit, `--no-auth` refuses foreign Hosts and Origins, keys are revoked and rotated at once, malformed
bodies are 400s in OpenAI's shape without server paths, and a finished job is recorded in one
transaction. In-process (FastAPI's TestClient) on a tiny random model; no training runs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tunery.errors import TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import CheckpointRow, Job, ModelRow, now
from tunery.serve.app import create_app
from tunery.serve.common import Settings

pytestmark = pytest.mark.usefixtures("one_thread")
ADMIN = "admin-key"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def shape(resp, status: int, code: str | None = None) -> dict:
    """The response is an OpenAI error of this status (and code); returns the error object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def chat_jsonl(n: int = 10) -> bytes:
    rows = (
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(n)
    )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make_client(tmp_path: Path, **kw) -> TestClient:
    kw.setdefault("api_key", ADMIN)
    settings = Settings(data_dir=tmp_path / "data", run_executor=False, allow_local_models=True, **kw)
    return TestClient(create_app(settings), raise_server_exceptions=False)


def upload(c: TestClient, key: str, data: bytes, name: str = "train.jsonl") -> str:
    r = c.post("/v1/files", headers=auth(key), files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


# ---------------------------------------------------------------------------------------------
# One request's bad input never fails another's


def test_bad_token_ids_are_400_and_a_concurrent_request_succeeds(tmp_path, tiny_llama):
    model = str(tiny_llama)
    with make_client(tmp_path) as c:
        bob = c.app.state.store.create_key("bob")[1]
        good_body = {"model": model, "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        assert c.post("/v1/completions", headers=auth(bob), json=good_body).status_code == 200  # warm up

        results: dict[str, list] = {"good": [], "bad": []}

        def good() -> None:
            for _ in range(3):
                results["good"].append(c.post("/v1/completions", headers=auth(bob), json=good_body))

        def bad() -> None:
            for prompt in ([1_000_000_000], [-5], [[1, 2, 3], [4, 10**12]], [True, 3]):
                body = {"model": model, "prompt": prompt, "max_tokens": 6}
                results["bad"].append(c.post("/v1/completions", headers=auth(ADMIN), json=body))

        threads = [threading.Thread(target=good), threading.Thread(target=bad)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r.status_code for r in results["good"]] == [200, 200, 200]
        assert all(r.json()["choices"][0]["text"] is not None for r in results["good"])
        codes = [shape(r, 400)["code"] for r in results["bad"]]
        assert codes[:3] == ["invalid_prompt"] * 3
        assert "1000000000" in results["bad"][0].json()["error"]["message"]
        assert results["bad"][0].json()["error"]["param"] == "prompt"

        # logit_bias keys are token ids of the model, checked before anything is queued
        body = {**good_body, "logit_bias": {"99999999": 5}}
        assert "99999999" in shape(c.post("/v1/completions", headers=auth(bob), json=body), 400)["message"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"-1": 1}}
        shape(c.post("/v1/chat/completions", headers=auth(bob), json=body), 400)


def test_a_failing_batch_is_retried_per_request(tiny_llama):
    """A request that gets past validation and still breaks its batch fails alone: the engine decodes
    the batch's other requests again, one by one."""
    from tunery.generation.engine import Engine, GenerationHandle, _Request
    from tunery.generation.sequence import GenerationParams

    engine = Engine(batch_wait=0.05)
    try:
        spec = str(tiny_llama)
        ids = list(engine.tokenizer(spec)("Hello there")["input_ids"])
        params = GenerationParams(max_new_tokens=4)
        key, _ = engine.resolve(spec, None)
        with engine._cv:  # both are pending when the worker takes its next batch
            good = engine.submit(spec, None, ids, params)
            poisoned = GenerationHandle(1)  # an id past the embedding table, as if validation missed it
            engine._pending.append(_Request(key, None, [10**9], params, poisoned))
        assert good.result(timeout=120)[0].completion_tokens > 0
        with pytest.raises(IndexError):
            poisoned.result(timeout=120)
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# One validation for every hyperparameter


@pytest.mark.parametrize(
    "name, value", [("n_epochs", 1e6), ("max_length", 1e9), ("batch_size", 1e6), ("max_length", -1)]
)
def test_tunery_hyperparameters_have_the_same_ranges(tmp_path, name, value):
    with make_client(tmp_path) as c:
        file_id = upload(c, ADMIN, chat_jsonl())
        for body, param in (
            ({"tunery": {"hyperparameters": {name: value}}}, f"tunery.hyperparameters.{name}"),
            ({"hyperparameters": {name: value}} if name != "max_length" else None, f"hyperparameters.{name}"),
        ):
            if body is None:  # OpenAI's block has no max_length: unknown names are refused there
                continue
            r = c.post(
                "/v1/fine_tuning/jobs",
                headers=auth(ADMIN),
                json={"model": "smollm2-135m", "training_file": file_id, **body},
            )
            err = shape(r, 400)
            assert err["param"] == param and name in err["message"]
        assert c.app.state.store.list_jobs() == []


# ---------------------------------------------------------------------------------------------
# Per-key quotas


def test_per_key_quotas_answer_429_naming_the_limit(tmp_path, tiny_llama):
    kw = dict(max_active_jobs_per_key=1, max_storage_mb_per_key=1, requests_per_minute=12)
    with make_client(tmp_path, **kw) as c:
        bob = c.app.state.store.create_key("bob")[1]
        job = {"model": str(tiny_llama), "training_file": upload(c, ADMIN, chat_jsonl())}
        assert c.post("/v1/fine_tuning/jobs", headers=auth(ADMIN), json=job).status_code == 200
        err = shape(c.post("/v1/fine_tuning/jobs", headers=auth(ADMIN), json=job), 429)
        assert err["code"] == "active_jobs_limit_exceeded" and err["type"] == "rate_limit_error"
        assert "1 per key" in err["message"]

        big = b"x" * 700_000
        files = {"file": ("a.txt", big)}
        assert c.post("/v1/files", headers=auth(bob), files=files, data={"purpose": "user_data"}).is_success
        r = c.post("/v1/files", headers=auth(bob), files=files, data={"purpose": "user_data"})
        assert "1 MB per key" in shape(r, 429, "storage_limit_exceeded")["message"]
        assert len(c.app.state.store.list_files(c.app.state.store.key_for(bob).id)) == 1

        # 12 requests a minute: bob has made 2, the admin 4; the admin still has room when bob is out.
        for _ in range(10):
            assert c.get("/v1/models", headers=auth(bob)).status_code == 200
        r = c.get("/v1/models", headers=auth(bob))
        shape(r, 429, "requests_per_minute_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/v1/models", headers=auth(ADMIN)).status_code == 200


# ---------------------------------------------------------------------------------------------
# --no-auth: loopback Hosts and same-origin posts only


def test_no_auth_refuses_foreign_hosts_and_cross_origin_posts(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", no_auth=True, run_executor=False))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/models").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
        # DNS rebinding: the attacker's name now points at 127.0.0.1, the Host header still names it.
        err = shape(c.get("/v1/models", headers={"Host": "rebind.attacker.example"}), 403, "invalid_host")
        assert "rebind.attacker.example" in err["message"]
        shape(c.get("/healthz", headers={"Host": "rebind.attacker.example:8000"}), 403, "invalid_host")

        files = {"file": ("t.jsonl", chat_jsonl())}
        form = {"purpose": "fine-tune"}
        for origin in ("http://evil.example", "null", "http://localhost:3000", "http://127.0.0.1:9999"):
            r = c.post("/v1/files", files=files, data=form, headers={"Origin": origin})
            shape(r, 403, "cross_origin_request")
        r = c.post("/v1/files", files=files, data=form, headers={"Sec-Fetch-Site": "cross-site"})
        shape(r, 403, "cross_origin_request")
        assert c.get("/v1/files").json()["data"] == []  # nothing was stored
        # The dashboard posts from the server's own origin; scripts send no Origin at all.
        assert c.post(
            "/v1/files", files=files, data=form, headers={"Origin": "http://127.0.0.1:8000"}
        ).is_success
        assert c.post("/v1/files", files=files, data=form).is_success
        # A cross-origin GET is harmless (the browser does not let the page read it) and allowed.
        assert c.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# Keys: revoke and rotate, over HTTP and the CLI, at once despite the key cache


def _keys_cli(*args: str):
    from tunery.serve.keys_cli import keys_app

    result = CliRunner().invoke(keys_app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_keys_revoke_and_rotate_take_effect_at_once(tmp_path):
    data = tmp_path / "data"
    with make_client(tmp_path) as c:
        store = c.app.state.store
        bob_row, bob = store.create_key("bob")
        carol_row, carol = store.create_key("carol")
        for key in (bob, carol):  # both are in the key cache now
            assert c.get("/v1/models", headers=auth(key)).status_code == 200

        shape(c.get("/v1/tunery/keys", headers=auth(bob)), 403, "admin_key_required")
        listed = c.get("/v1/tunery/keys", headers=auth(ADMIN)).json()["data"]
        assert {k["name"] for k in listed} == {"admin", "bob", "carol"}
        assert all("key" not in k and "key_hash" not in k for k in listed)

        r = c.post(f"/v1/tunery/keys/{bob_row.id}/revoke", headers=auth(ADMIN))
        assert r.status_code == 200 and r.json()["revoked_at"]
        shape(c.get("/v1/models", headers=auth(bob)), 401, "invalid_api_key")

        # `tunery keys revoke` is another process: the running server must still stop carol at once.
        _keys_cli("revoke", carol_row.id, "--data-dir", str(data))
        shape(c.get("/v1/models", headers=auth(carol)), 401, "invalid_api_key")
        assert "revoked" in _keys_cli("list", "--data-dir", str(data)).output

        # Rotate the --api-key admin key without a restart: same id, so its files stay its own.
        file_id = upload(c, ADMIN, chat_jsonl())
        admin_id = store.key_for(ADMIN).id
        shape(c.post(f"/v1/tunery/keys/{admin_id}/revoke", headers=auth(ADMIN)), 400, "last_admin_key")
        r = c.post(f"/v1/tunery/keys/{admin_id}/rotate", headers=auth(ADMIN))
        new_admin = r.json()["key"]
        assert r.json()["id"] == admin_id and new_admin != ADMIN
        shape(c.get("/v1/models", headers=auth(ADMIN)), 401, "invalid_api_key")
        assert c.get(f"/v1/files/{file_id}", headers=auth(new_admin)).status_code == 200

    # A restart with the old --api-key does not bring it back; the rotated key still works.
    with make_client(tmp_path) as c:
        shape(c.get("/v1/models", headers=auth(ADMIN)), 401, "invalid_api_key")
        assert c.get("/v1/models", headers=auth(new_admin)).status_code == 200
        dave_row, dave = c.app.state.store.create_key("dave")
        assert c.get("/v1/models", headers=auth(dave)).status_code == 200
        new_dave = _keys_cli("rotate", dave_row.id, "--data-dir", str(data)).stdout.strip().splitlines()[-1]
        shape(c.get("/v1/models", headers=auth(dave)), 401, "invalid_api_key")
        assert c.get("/v1/models", headers=auth(new_dave)).status_code == 200
        # a key may rotate itself, not another
        shape(c.post(f"/v1/tunery/keys/{admin_id}/rotate", headers=auth(new_dave)), 403, "admin_key_required")


def test_schema_and_docs_need_a_key_and_healthz_says_nothing(tmp_path):
    with make_client(tmp_path) as c:
        shape(c.get("/openapi.json"), 401, "invalid_api_key")
        shape(c.get("/docs"), 401, "invalid_api_key")
        assert "/v1/files" in c.get("/openapi.json", headers=auth(ADMIN)).json()["paths"]
        assert c.get("/docs", headers=auth(ADMIN)).status_code == 200
        assert c.get("/redoc").status_code == 404
        assert c.get("/healthz").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------
# Malformed bodies are 400s; messages show no server paths


def test_malformed_bodies_are_400_not_500(tmp_path, tiny_llama):
    with make_client(tmp_path) as c:
        job = {"model": str(tiny_llama), "training_file": upload(c, ADMIN, chat_jsonl())}
        for extra, param in (
            ({"tunery": {"options": [1]}}, "tunery.options"),
            ({"tunery": {"options": {"lora": 5}}}, "tunery.options"),
            ({"objective": ["x"]}, "tunery.objective"),
            ({"tunery": {"method": {"a": 1}}}, "tunery.method"),
            # auto_rule is one of two names; a path or a URL in it is refused, not passed on
            ({"tunery": {"hyperparameters": {"auto_rule": "../../etc"}}}, "hyperparameters.auto_rule"),
            ({"tunery": {"hyperparameters": {"auto_rule": 1}}}, "hyperparameters.auto_rule"),
        ):
            r = c.post("/v1/fine_tuning/jobs", headers=auth(ADMIN), json={**job, **extra})
            assert shape(r, 400)["param"] == param, extra
        for body, param in (
            ({"n_examples": "abc"}, "n_examples"),
            ({"n_examples": 10, "tokens_per_example": [1]}, "tokens_per_example"),
            ({"n_examples": 10, "hyperparameters": {"batch_size": "x"}}, "hyperparameters.batch_size"),
            ({"n_examples": 10, "hyperparameters": {"auto_rule": "gpu"}}, "hyperparameters.auto_rule"),
            ({"n_examples": 10, "hyperparameters": {"auto_rule": ["device"]}}, "hyperparameters.auto_rule"),
            ({"n_examples": 10, "options": [1]}, "options"),
        ):
            r = c.post("/v1/tunery/estimate", headers=auth(ADMIN), json={"model": str(tiny_llama), **body})
            assert shape(r, 400)["param"] == param, body
        multipart = {**auth(ADMIN), "Content-Type": "multipart/form-data; boundary=XyZ"}
        for broken in (b"garbage", b"--XyZ\r\nbroken header\r\n\r\nzzz", b"--XyZ\r\n\r\n\r\n--XyZ--\r\n"):
            r = c.post("/v1/files", headers=multipart, content=broken)
            assert 400 <= r.status_code < 500, (broken, r.text)
            shape(r, r.status_code)


def test_error_messages_hide_server_paths(tmp_path):
    from tunery.serve.common import render_tunery_error

    data = (tmp_path / "data").resolve()
    exc = TuneryError(f"Cannot read {data}/jobs/ftjob-1/model: no config.json", hint=f"look in {data}")
    body = json.loads(render_tunery_error(exc).body)["error"]["message"]
    assert str(tmp_path) not in body and "model: no config.json" in body
    assert (
        "GET /v1/models"
        in json.loads(render_tunery_error(TuneryError("GET /v1/models")).body)["error"]["message"]
    )

    # A failed job's error (the client reads it) names no server path either; the log has them.
    from tunery.jobs.local import LocalExecutor

    store = Store(data)
    try:
        job = _running_job(store)
        LocalExecutor(store)._fail(job, {"code": "x", "message": f"Bad data in {data}/files/file-1: line 3"})
        got = store.get_job(None, job.id).error["message"]
        assert str(data) not in got and got.endswith("file-1: line 3")
        # and so do the events a worker writes, which the job's event list shows
        store.ingest(job, [{"message": f"Reading {data}/files/file-2", "created_at": 5}], [])
        assert store.list_events(job.id)[0][0].message == "Reading …/file-2"
        assert store.has_event(job.id, 5, f"Reading {data}/files/file-2")  # a re-read is not stored twice
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# Integrity: one transaction for success, durable renames


def _running_job(store: Store) -> Job:
    job_id = "ftjob-" + os.urandom(6).hex()
    job = Job(
        id=job_id,
        owner="key_owner",
        status="running",
        model="smollm2-135m",
        training_file="file-x",
        hyperparameters={},
        method={},
        tunery={},
        seed=1,
        output_name=f"ft:smollm2-135m:o::{job_id[-8:]}",
        created_at=now(),
        run_dir=f"jobs/{job_id}",
        result_files=[],
    )
    store.add_job(job)
    (store.path(job.run_dir) / "model").mkdir(parents=True)
    return job


def test_success_is_recorded_once_in_one_transaction(tmp_path):
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from tunery.jobs.local import LocalExecutor

    store = Store(tmp_path / "data")
    try:
        job = _running_job(store)
        run_dir = store.path(job.run_dir)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "train_loss": 1.5}) + "\n")
        (run_dir / "results.csv").write_text("step,train_loss\n4,1.5\n")
        executor = LocalExecutor(store)
        executor._succeed(job, {"trained_tokens": 99})
        executor._succeed(job, {"trained_tokens": 99})  # a restarted server concluding it again
        done = store.get_job(None, job.id)
        assert done.status == "succeeded" and done.fine_tuned_model == job.output_name
        with store.tx() as s:
            ckpts = list(s.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job.id)))
        assert [(c.step, c.model_name) for c in ckpts] == [(4, job.output_name)]
        messages = [e.message for e in store.list_events(job.id, limit=50)[0]]
        assert messages.count("The job has successfully completed") == 1
        assert len(done.result_files) == 1 and len(store.list_files("key_owner")) == 1

        # When the last write fails (here: a status the schema refuses), nothing of the success is
        # kept: no model, no checkpoint, the job still running.
        other = _running_job(store)
        model = ModelRow(name=other.output_name, owner="key_owner", base="b", path="p", created_at=now())
        with pytest.raises(IntegrityError):
            store.record_success(
                other.id, model, {"step": 1, "model_name": "m", "path": "p"}, None, [], status=None
            )
        assert store.find_model("key_owner", other.output_name) is None
        assert store.list_checkpoints(other.id) == [] and store.get_job(None, other.id).status == "running"
    finally:
        store.close()


def test_atomic_writes_fsync_the_directory(tmp_path, monkeypatch):
    from tunery.fsutil import write_atomic

    synced: list[bool] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_atomic(tmp_path / "run.json", "{}")
    assert (tmp_path / "run.json").read_text() == "{}"
    assert synced == [False, True]  # the file's bytes, then the directory holding its new name
