"""The job store on SQLite and on a real PostgreSQL server (one throwaway cluster per session, started by
conftest.py with initdb/pg_ctl on loopback; skipped, with the reason, only when those binaries are
missing), and a real job with its events and a kill -9 recovery on PostgreSQL."""

from __future__ import annotations

import io
import time

import pytest

from tunery.errors import NotFoundError, TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import Job, ModelRow, hash_key, new_id, now


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(tmp_path / "data")
        assert s.url.startswith("sqlite")
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    else:
        url = request.getfixturevalue("postgres_url")
        s = Store(tmp_path / "data", url)
        assert s.url.startswith("postgresql+psycopg://")
        from tunery.jobs.tables import Base

        Base.metadata.drop_all(s.engine)  # each test starts from empty tables
        Base.metadata.create_all(s.engine)
    yield s
    s.close()


def _job(store: Store, owner: str, **kw) -> Job:
    job_id = new_id("ftjob-")
    fields = dict(
        id=job_id,
        owner=owner,
        status="queued",
        model="m",
        training_file="file-x",
        seed=1,
        hyperparameters={"n_epochs": "auto"},
        method={"type": "supervised"},
        tunery={},
        output_name=f"ft:m:{owner}::abcdefgh",
        run_dir=f"jobs/{job_id}",
        created_at=now(),
        result_files=[],
        events_offset=0,
        attempts=0,
        resume=False,
    )
    fields.update(kw)
    return store.add_job(Job(**fields), events=[("info", f"Created fine-tuning job: {job_id}")])


def test_keys_are_hashed(store):
    row, key = store.create_key("alice")
    assert store.key_for(key).id == row.id and row.key_hash == hash_key(key) and key not in row.key_hash
    assert store.key_for(key + "x") is None
    assert (
        store.ensure_key("admin-key").is_admin
        and store.ensure_key("admin-key").id == store.key_for("admin-key").id
    )


def test_files_atomic_isolated_and_limited(store):
    row = store.save_file("alice", "../../etc/passwd", "fine-tune", io.BytesIO(b"x" * 3000))
    path = store.path(row.path)
    assert row.id.startswith("file-") and path.parent == store.data_dir / "files" and path.name == row.id
    assert path.read_bytes() == b"x" * 3000 and row.bytes == 3000 and row.filename == "../../etc/passwd"
    with pytest.raises(NotFoundError):
        store.get_file("bob", row.id)
    with pytest.raises(TuneryError) as err:
        store.save_file("alice", "big", "fine-tune", iter([b"y" * 600, b"y" * 600]), max_bytes=1000)
    assert err.value.code == "file_too_large"
    assert store.count_files("alice") == 1 and not list((store.data_dir / "files" / ".tmp").iterdir())
    second = store.save_file("alice", "b.jsonl", "fine-tune", iter([b"{}\n"]))
    assert {f.id for f in store.list_files("alice")} == {second.id, row.id}
    assert store.list_files("alice", purpose="batch") == []
    store.delete_file("alice", row.id)
    assert not path.exists() and store.count_files("alice") == 1


def test_job_compare_and_set(store):
    job = _job(store, "alice")
    assert store.update_job(job.id, expect=("running",), status="failed") is None  # not running: no change
    assert store.update_job(job.id, expect=("queued",), status="running").status == "running"
    assert store.update_job(job.id, expect=("queued",), status="cancelled") is None
    assert store.get_job("alice", job.id).status == "running"
    with pytest.raises(NotFoundError):
        store.get_job("bob", job.id)
    assert [j.id for j in store.list_jobs(statuses=("running",))] == [job.id]
    assert store.list_jobs("bob") == []


def test_events_ingest_and_paging(store):
    job = _job(store, "alice")
    rows = [
        {"created_at": now(), "message": f"Step {i}/5", "type": "metrics", "data": {"step": i}}
        for i in range(1, 6)
    ]
    store.ingest(
        job,
        rows,
        [
            {
                "step": 5,
                "metrics": {"train_loss": 0.5},
                "model_name": "ft:m:a::x:ckpt-step-5",
                "path": f"{job.run_dir}/checkpoints/step-5/model",
            }
        ],
        events_offset=1234,
    )
    assert store.get_job(None, job.id).events_offset == 1234
    page1, more = store.list_events(job.id, limit=4)
    assert more and [e.message for e in page1] == ["Step 5/5", "Step 4/5", "Step 3/5", "Step 2/5"]
    page2, more = store.list_events(job.id, after=page1[-1].id, limit=4)
    assert not more and [e.message for e in page2] == ["Step 1/5", f"Created fine-tuning job: {job.id}"]
    assert page1[0].data == {"step": 5}
    assert [c.step for c in store.list_checkpoints(job.id)] == [5]
    assert [e.message for e in store.events_since(job.id, page2[0].seq)][:1] == ["Step 2/5"]


def test_models_and_checkpoints_resolve_per_owner(store):
    job = _job(store, "alice", tunery={"base_spec": "/models/base"})
    store.ingest(
        job,
        [],
        [
            {
                "step": 2,
                "metrics": None,
                "model_name": f"{job.output_name}:ckpt-step-2",
                "path": "jobs/x/checkpoints/step-2/model",
            }
        ],
    )
    model_dir = store.path(f"{job.run_dir}/model")
    model_dir.mkdir(parents=True)
    store.add_model(
        ModelRow(
            name=job.output_name,
            owner="alice",
            base="/models/base",
            path=f"{job.run_dir}/model",
            job_id=job.id,
            created_at=now(),
        )
    )
    assert store.find_model("alice", job.output_name) == ("/models/base", f"{job.run_dir}/model")
    assert store.find_model("alice", f"{job.output_name}:ckpt-step-2") == (
        "/models/base",
        "jobs/x/checkpoints/step-2/model",
    )
    assert store.find_model("bob", job.output_name) is None
    with pytest.raises(NotFoundError):
        store.delete_model("bob", job.output_name)
    store.delete_model("alice", job.output_name)
    assert store.find_model("alice", job.output_name) is None and not model_dir.exists()


def test_api_over_postgres(postgres_url, tmp_path):
    """The HTTP API on PostgreSQL: upload, create, list, cancel (no training: the executor is off)."""
    import json

    from fastapi.testclient import TestClient

    from tests.helpers.tiny import make_tiny_model_dir
    from tunery.jobs.tables import Base
    from tunery.serve.app import create_app
    from tunery.serve.common import Settings

    model = make_tiny_model_dir(tmp_path / "tiny")
    Base.metadata.drop_all(Store(tmp_path / "d0", postgres_url).engine)
    app = create_app(
        Settings(
            data_dir=tmp_path / "data",
            api_key="k1",
            database_url=postgres_url,
            run_executor=False,
            allow_local_models=True,
        )
    )
    rows = "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i)}]}
        )
        + "\n"
        for i in range(10)
    )
    with TestClient(app) as client:
        h = {"Authorization": "Bearer k1"}
        up = client.post(
            "/v1/files", headers=h, files={"file": ("t.jsonl", rows.encode())}, data={"purpose": "fine-tune"}
        ).json()
        assert up["bytes"] == len(rows) and up["status"] == "processed"
        created = client.post(
            "/v1/fine_tuning/jobs",
            headers=h,
            json={"model": str(model), "training_file": up["id"], "metadata": {"k": "v"}},
        ).json()
        assert created["status"] == "queued", created
        t0 = time.time()
        listed = client.get("/v1/fine_tuning/jobs", headers=h, params={"metadata[k]": "v"}).json()
        assert [j["id"] for j in listed["data"]] == [created["id"]] and time.time() - t0 < 5
        assert (
            client.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel", headers=h).json()["status"]
            == "cancelled"
        )
        events = client.get(f"/v1/fine_tuning/jobs/{created['id']}/events", headers=h).json()["data"]
        assert events[0]["message"] == "Cancellation requested"
        assert client.get(f"/v1/files/{up['id']}/content", headers=h).content == rows.encode()


def _count_rows(n: int) -> str:
    import json

    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Count to {i}"},
                    {"role": "assistant", "content": " ".join(map(str, range(i)))},
                ]
            }
        )
        + "\n"
        for i in range(1, n + 1)
    )


def _wait(predicate, timeout: float, what: str, log) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}:\n{log()[-2000:]}"
        time.sleep(0.5)


@pytest.mark.slow  # two servers and a training job resumed across them
def test_job_events_and_kill_9_recovery_on_postgres(postgres_url, tmp_path):
    """A real training job on PostgreSQL: its events and checkpoints land in the database; kill -9
    of the server mid-job, a restart on the same database, and the job resumes from its checkpoint."""
    import json

    from tests.helpers.server import start_server
    from tests.helpers.tiny import make_tiny_model_dir
    from tunery.jobs.executor import _pid_is_worker
    from tunery.jobs.tables import Base

    model = make_tiny_model_dir(tmp_path / "tiny")
    fresh = Store(tmp_path / "d0", postgres_url)
    Base.metadata.drop_all(fresh.engine)  # the server creates its tables on the empty database
    fresh.close()
    data, train = tmp_path / "data", tmp_path / "train.jsonl"
    # long enough that the kill lands mid-training on a quiet machine too (16 rows could finish first)
    n = 48
    train.write_text(_count_rows(n))
    server = start_server(data, "test-admin-key", "--database-url", postgres_url)
    try:
        client = server.client()
        with open(train, "rb") as f:
            upload = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=str(model),
            training_file=upload.id,
            hyperparameters={"n_epochs": 1, "batch_size": 1},
            extra_body={"tunery": {"hyperparameters": {"save_steps": 2}}},
        )
        store = Store(data, postgres_url)
        _wait(lambda: store.get_job(None, job.id).pid, 180, "the worker", server.log)
        pid = store.get_job(None, job.id).pid
        # no shutdown hooks run: the job row in PostgreSQL still says running
        server.kill_mid_job(pid, data / "jobs" / job.id)
        assert store.get_job(None, job.id).status == "running"
        # the orphaned worker notices its server is gone, checkpoints and exits on its own
        _wait(lambda: not _pid_is_worker(pid, job.id), 60, "the orphaned worker to exit", server.log)
        assert json.loads((data / "jobs" / job.id / "run.json").read_text())["status"] == "interrupted"
        store.close()
    finally:
        server.stop()

    server = start_server(data, "test-admin-key", "--database-url", postgres_url)
    try:
        client = server.client()
        done = ("succeeded", "failed", "cancelled")
        _wait(lambda: client.fine_tuning.jobs.retrieve(job.id).status in done, 240, "the job", server.log)
        finished = client.fine_tuning.jobs.retrieve(job.id)
        assert finished.status == "succeeded", finished.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data][::-1]
    finally:
        server.stop()
    assert any("The server restarted during this job" in m for m in messages)
    assert any(m.startswith("Worker started; resuming from checkpoint step-") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    # steps before the checkpoint are not trained twice, and every step is logged once
    assert [sum(m.startswith(f"Step {i}/{n}:") for m in messages) for i in range(1, n + 1)] == [1] * n
    # all of it lives in PostgreSQL, none in a SQLite file beside the data
    store = Store(tmp_path / "reader", postgres_url)
    try:
        rows, _ = store.list_events(job.id, limit=200)
        assert [e.message for e in rows][::-1] == messages
        assert store.get_job(None, job.id).status == "succeeded"
        assert store.list_checkpoints(job.id)
    finally:
        store.close()
    assert not (data / "tunery.db").exists()
