"""Restart recovery of the local executor, on run dirs shaped as the trainer leaves them."""

from __future__ import annotations

import base64
import io
import json

from tunery.jobs.local import LocalExecutor
from tunery.jobs.store import Store
from tunery.jobs.tables import Job, new_id, now


def _running_job(store: Store, **kw) -> Job:
    upload = store.save_file("key_a", "t.jsonl", "fine-tune", io.BytesIO(b"{}\n"))
    job_id = new_id("ftjob-")
    job = Job(
        id=job_id,
        owner="key_a",
        status="running",
        model="m",
        training_file=upload.id,
        seed=1,
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        method={"type": "supervised"},
        tunery={"base_spec": "/models/base"},
        output_name="ft:base:alice::abcdefgh",
        run_dir=f"jobs/{job_id}",
        created_at=now(),
        result_files=[],
        events_offset=0,
        attempts=1,
        resume=False,
        pid=None,
    )
    for key, value in kw.items():
        setattr(job, key, value)
    store.add_job(job)
    (store.path(job.run_dir)).mkdir(parents=True)
    return job


def _events(run_dir, rows) -> None:
    with open(run_dir / "events.jsonl", "a") as f:
        for r in rows:
            f.write(
                json.dumps({"created_at": now(), "level": "info", "type": "message", "data": {}, **r}) + "\n"
            )


def test_job_finished_while_server_was_down_is_completed(tmp_path):
    store = Store(tmp_path / "data")
    job = _running_job(store)
    run_dir = store.path(job.run_dir)
    _events(
        run_dir,
        [
            {
                "message": "Step 1/2: training loss=1.0",
                "type": "metrics",
                "data": {"step": 1, "train_loss": 1.0},
            },
            {
                "message": "saved",
                "data": {
                    "kind": "checkpoint",
                    "step": 1,
                    "path": "checkpoints/step-000001",
                    "metrics": {"train_loss": 1.0},
                },
            },
            {
                "message": "Step 2/2: training loss=0.5",
                "type": "metrics",
                "data": {"step": 2, "train_loss": 0.5},
            },
        ],
    )
    (run_dir / "checkpoints" / "step-000001" / "model").mkdir(parents=True)
    (run_dir / "model").mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "train_loss": 0.5}) + "\n")
    (run_dir / "results.csv").write_text("step,train_loss\n1,1.0\n2,0.5\n")
    (run_dir / "config.yaml").write_text(
        "hyperparameters:\n  n_epochs: 1\n  batch_size: 1\n  learning_rate_multiplier: 0.05\n"
    )
    (run_dir / "run.json").write_text(
        json.dumps({"status": "succeeded", "error": None, "trained_tokens": 99, "model_dir": "model"})
    )
    LocalExecutor(store).recover()

    done = store.get_job("key_a", job.id)
    assert (
        done.status == "succeeded" and done.fine_tuned_model == job.output_name and done.trained_tokens == 99
    )
    assert done.hyperparameters == {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 0.05}
    assert store.find_model("key_a", job.output_name) == ("/models/base", f"{job.run_dir}/model")
    assert store.find_model("key_a", f"{job.output_name}:ckpt-step-1") == (
        "/models/base",
        f"{job.run_dir}/checkpoints/step-000001/model",
    )
    messages = [e.message for e in store.list_events(job.id, limit=50)[0]][::-1]
    assert messages[:3] == [
        "Step 1/2: training loss=1.0",
        f"Checkpoint created at step 1 with Snapshot ID: {job.output_name}:ckpt-step-1",
        "Step 2/2: training loss=0.5",
    ]
    assert messages[-1] == "The job has successfully completed"
    result = store.get_file("key_a", done.result_files[0])
    assert result.purpose == "fine-tune-results"
    assert base64.b64decode(store.path(result.path).read_bytes()).decode().startswith("step,train_loss")
    # Following again reads nothing twice: the offset was stored with the events.
    LocalExecutor(store)._follow(job.id)
    assert len(store.list_events(job.id, limit=50)[0]) == len(messages)


def test_interrupted_job_is_requeued_to_resume(tmp_path):
    store = Store(tmp_path / "data")
    with_ckpt, without = _running_job(store), _running_job(store)
    (store.path(with_ckpt.run_dir) / "checkpoints" / "step-000004").mkdir(parents=True)
    (store.path(with_ckpt.run_dir) / "run.json").write_text(json.dumps({"status": "interrupted"}))
    LocalExecutor(store).recover()
    a, b = store.get_job(None, with_ckpt.id), store.get_job(None, without.id)
    assert (a.status, a.resume) == ("queued", True)
    assert (b.status, b.resume) == ("queued", False)  # nothing to resume from: it starts over
    assert "The server restarted during this job" in store.list_events(a.id, limit=1)[0][0].message


def test_job_whose_files_are_gone_fails_with_reason(tmp_path):
    store = Store(tmp_path / "data")
    job = _running_job(store)
    store.path(store.get_file("key_a", job.training_file).path).unlink()
    LocalExecutor(store).recover()
    failed = store.get_job(None, job.id)
    assert failed.status == "failed" and failed.error["code"] == "file_not_found"
    assert job.training_file in failed.error["message"] and "missing" in failed.error["message"]
