"""kill -9 the server in the middle of a job, restart it on the same data dir: nothing is lost and
the job resumes from its last checkpoint."""

from __future__ import annotations

import json
import time

from tests.helpers.server import start_server
from tests.helpers.tiny import make_tiny_model_dir
from tunery.jobs.executor import _pid_is_worker
from tunery.jobs.store import Store


def _rows(n: int) -> str:
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


def test_kill_9_mid_job_then_restart_resumes(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "data"
    (tmp_path / "train.jsonl").write_text(_rows(40))
    server = start_server(data)
    try:
        client = server.client()
        with open(tmp_path / "train.jsonl", "rb") as f:
            upload = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=str(model),
            training_file=upload.id,
            suffix="durable",
            hyperparameters={"n_epochs": 1},
            extra_body={"tunery": {"hyperparameters": {"save_steps": 2}}},
        )
        store = Store(data)
        deadline = time.time() + 180
        while not (pid := store.get_job(None, job.id).pid):
            assert time.time() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        run_dir = data / "jobs" / job.id
        server.kill_mid_job(pid, run_dir)  # no shutdown hooks run: the job row still says running
        assert store.get_job(None, job.id).status == "running"

        # The orphaned worker notices its server is gone, checkpoints and exits on its own.
        deadline = time.time() + 60
        while _pid_is_worker(pid, job.id):
            assert time.time() < deadline, "the orphaned worker kept running"
            time.sleep(0.5)
        assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
        store.close()
    finally:
        server.stop()

    server = start_server(data)
    try:
        client = server.client()
        assert client.files.content(upload.id).content == (tmp_path / "train.jsonl").read_bytes()
        deadline = time.time() + 240
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.time() < deadline, server.log()[-2000:]
            time.sleep(1)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data][::-1]
        assert any("The server restarted during this job" in m for m in messages)
        assert any(m.startswith("Worker started; resuming from checkpoint step-") for m in messages)
        assert messages[-1] == "The job has successfully completed"
        # Steps before the checkpoint are not trained twice: step 1 is logged once.
        assert sum(m.startswith("Step 1/40:") for m in messages) == 1
        assert sum(m.startswith("Step 40/40:") for m in messages) == 1
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "Count to 3"}]
        )
        assert reply.choices[0].message.role == "assistant"
    finally:
        server.stop()
