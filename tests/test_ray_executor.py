"""The `ray` executor against a real local Ray head (started here, loopback only): the handle's
status mapping and stop semantics, then `tunery serve --executor ray` end to end."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")
pytest.importorskip("aiohttp", reason="Ray's job server needs ray[default]")

from tests.helpers.server import free_port, start_server  # noqa: E402
from tests.helpers.tiny import make_tiny_model_dir  # noqa: E402
from tunery.errors import ExecutorError  # noqa: E402
from tunery.jobs import spec  # noqa: E402
from tunery.jobs.ray_executor import RayJob, connect, returncode  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own session on loopback ports; yields the dashboard URL.

    Teardown ends exactly the processes this head started (by pid), never `ray stop`, which would
    stop every Ray cluster on the machine."""
    import httpx
    import psutil

    # Unix socket paths under the temp dir must stay under 108 bytes: a short dir, not tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="tray-", dir="/tmp")
    ports: dict[str, int] = {}
    for name in (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "node-manager-port",
        "object-manager-port",
    ):
        # Each call may hand back a port an earlier call returned (it is free again once probed),
        # and Ray refuses to start when two components share one.
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[name] = port
    cmd = [
        shutil.which("ray") or "ray",
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    # On Linux Ray resolves 127.0.0.1 to the machine's public address unless told it is not a
    # multi-node cluster; this keeps every Ray socket on loopback.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not start in 120 s"
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        try:
            procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_head):
    return connect(ray_head)


def _wait_ended(job: RayJob, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while (rc := job.poll()) is None:
        assert time.time() < deadline, f"Ray job {job.submission_id} did not end"
        time.sleep(0.2)
    return rc


def _submit(client, script: str, grace: float = 10, **kw) -> RayJob:
    sid = f"test-{time.time_ns()}"
    code = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    return RayJob.submit(client, code, sid, num_cpus=1, num_gpus=0, env={}, grace=grace, **kw)


def test_exit_codes_map_to_return_codes(client, tmp_path):
    ok = _submit(client, "print('hello from ray')", log_path=tmp_path / "ok.log")
    bad = _submit(client, "import sys; sys.exit(3)")
    assert _wait_ended(ok) == 0 and ok.detail is None
    assert _wait_ended(bad) == 3 and bad.detail is None
    info = client.get_job_info(bad.submission_id)
    assert returncode(info) == (3, None)
    ok.close()  # Ray keeps the job's output; close() appends it to the run's worker.log
    assert "hello from ray" in (tmp_path / "ok.log").read_text()


def test_stop_sends_sigterm_and_waits_the_grace(client, tmp_path):
    """Ray SIGKILLs 3 s after its SIGTERM by default; the handle sets the wait to the grace, so a
    worker that takes 5 s to checkpoint still finishes."""
    marker = tmp_path / "checkpointed"
    started = tmp_path / "started"
    script = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(5)\n"
        f"    pathlib.Path({str(marker)!r}).write_text('ok')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(started)!r}).write_text('ok')\n"
        "time.sleep(120)\n"
    )
    job = _submit(client, script, grace=15)
    deadline = time.time() + 60
    while not started.exists():
        assert time.time() < deadline and job.poll() is None, "the Ray job never started"
        time.sleep(0.2)
    job.terminate()
    assert _wait_ended(job) == -signal.SIGTERM
    assert job.detail == "Ray: Job was intentionally stopped."
    assert marker.read_text() == "ok"


def test_a_job_ray_does_not_know_ends_with_a_reason(client):
    job = RayJob(client, "tunery-ftjob-unknown-1")
    assert job.poll() == 1 and "no longer knows" in job.detail


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    with pytest.raises(ExecutorError, match="Cannot reach the Ray cluster"):
        connect(f"http://127.0.0.1:{free_port()}")
    dead = f"http://127.0.0.1:{free_port()}"
    serve = [sys.executable, "-m", "tunery.serve", "--no-auth", "--data-dir", str(tmp_path / "data")]
    out = subprocess.run(
        [*serve, "--executor", "ray", "--ray-address", dead], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert f"error: Cannot reach the Ray cluster at '{dead}'" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([*serve, "--executor", "ray"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: --executor ray needs --ray-address" in out.stderr


def test_job_resources_are_validated():
    body = {"tunery": {"resources": {"num_cpus": 2, "num_gpus": 0.5}}}
    assert spec.parse_request(body)["tunery"]["resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert "resources" not in spec.parse_request({})["tunery"]  # the server's flags decide
    for bad, param in (
        ({"num_cpus": -1}, "tunery.resources.num_cpus"),
        ({"num_gpus": "all"}, "tunery.resources.num_gpus"),
        ({"memory": 8}, "tunery.resources"),
    ):
        with pytest.raises(spec.InvalidRequest) as err:
            spec.parse_request({"tunery": {"resources": bad}})
        assert err.value.param == param


def _rows(n: int) -> str:
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Count to {i % 9 + 1}"},
                    {"role": "assistant", "content": " ".join(map(str, range(i % 9 + 1)))},
                ]
            }
        )
        + "\n"
        for i in range(n)
    )


def _wait(client, job_id: str, until, timeout: float, server):
    deadline = time.time() + timeout
    while not until(job := client.fine_tuning.jobs.retrieve(job_id)):
        assert time.time() < deadline, f"{job.status}\n{server.log()[-3000:]}"
        time.sleep(0.5)
    return job


def _ray_ended(client, sid: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(sid).value)) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline, f"Ray job {sid} is still {status}"
        time.sleep(0.5)
    return status


def _messages(client, job_id: str) -> list[str]:
    """All of a job's messages, oldest first (the SDK's page iterator follows `after`)."""
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


def _newest(client, job_id: str) -> str:
    return client.fine_tuning.jobs.list_events(job_id, limit=1).data[0].id


def test_serve_on_ray_runs_reattaches_pauses_and_cancels(ray_head, client, tmp_path):
    from ray.util.state import list_actors

    model = make_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "data"
    (tmp_path / "short.jsonl").write_text(_rows(10))
    (tmp_path / "long.jsonl").write_text(_rows(400))
    args = ("--executor", "ray", "--ray-address", ray_head, "--concurrency", "2")
    server = start_server(data, "test-admin-key", *args)
    try:
        api = server.client()
        uploads = {}
        for name in ("short", "long"):
            with open(tmp_path / f"{name}.jsonl", "rb") as f:
                uploads[name] = api.files.create(file=f, purpose="fine-tune").id

        # 1. A short job runs to succeeded on Ray, with its events, checkpoints and model.
        job = api.fine_tuning.jobs.create(
            model=str(model),
            training_file=uploads["short"],
            suffix="onray",
            hyperparameters={"n_epochs": 1, "batch_size": 1},
            extra_body={"tunery": {"hyperparameters": {"save_steps": 5}}},
        )
        job = _wait(api, job.id, lambda j: j.status in TERMINAL, 300, server)
        assert job.status == "succeeded", job.error
        messages = _messages(api, job.id)
        sid = f"tunery-{job.id}-1"
        assert f"Submitted to Ray as job {sid} (1 CPUs, 0 GPUs)" in messages
        assert any(m.startswith("Step 10/10:") for m in messages)
        assert messages[-1] == "The job has successfully completed"
        assert str(client.get_job_status(sid).value) == "SUCCEEDED"
        steps = sorted(c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data)
        assert steps[-1] == 10 and 5 in steps
        assert job.fine_tuned_model in {m.id for m in api.models.list().data}
        assert f"Running entrypoint for job {sid}" in (data / "jobs" / job.id / "worker.log").read_text()

        # 2. A long job asks for 2 CPUs; it is running when the server stops...
        long = api.fine_tuning.jobs.create(
            model=str(model),
            training_file=uploads["long"],
            hyperparameters={"n_epochs": 10, "batch_size": 1},
            extra_body={
                "tunery": {
                    "hyperparameters": {"save_steps": 50, "logging_steps": 10},
                    "resources": {"num_cpus": 2},
                }
            },
        )
        long_sid = f"tunery-{long.id}-1"
        _wait(api, long.id, lambda j: any(m.startswith("Step ") for m in _messages(api, j.id)), 300, server)
        assert f"Submitted to Ray as job {long_sid} (2 CPUs, 0 GPUs)" in _messages(api, long.id)
        supervisor = list_actors(
            address=ray_head, detail=True, filters=[("name", "=", f"_ray_internal_job_actor_{long_sid}")]
        )
        assert supervisor[0].required_resources == {"CPU": 2.0}  # what Ray reserved for the worker
    finally:
        server.stop()

    # ...and keeps training on Ray meanwhile: the next server re-attaches to it, pauses,
    # resumes and cancels it.
    assert str(client.get_job_status(long_sid).value) == "RUNNING"
    server = start_server(data, "test-admin-key", *args)
    try:
        api = server.client()
        messages = _messages(api, long.id)
        assert "The server restarted during this job; it re-attached to its worker." in messages
        assert api.fine_tuning.jobs.retrieve(long.id).status == "running"
        seen = _newest(api, long.id)
        _wait(api, long.id, lambda j: _newest(api, j.id) != seen, 120, server)  # it is followed again

        # Pause stops the Ray job; resume submits attempt 2, which starts from the saved checkpoint.
        assert api.fine_tuning.jobs.pause(long.id).status == "paused"
        _wait(api, long.id, lambda j: "Fine-tuning job paused" in _messages(api, j.id), 120, server)
        assert _ray_ended(client, long_sid) == "STOPPED"
        assert api.fine_tuning.jobs.resume(long.id).status == "queued"
        long_sid = f"tunery-{long.id}-2"
        _wait(api, long.id, lambda j: _messages(api, j.id)[-1].startswith("Step "), 300, server)
        messages = _messages(api, long.id)
        assert any(m.startswith("Worker started; resuming from checkpoint step-") for m in messages)
        assert f"Submitted to Ray as job {long_sid} (2 CPUs, 0 GPUs)" in messages

        assert api.fine_tuning.jobs.cancel(long.id).status == "cancelled"
        assert _ray_ended(client, long_sid) == "STOPPED"
        _wait(
            api,
            long.id,
            lambda j: "Fine-tuning job cancelled; its last checkpoint is kept." in _messages(api, j.id),
            60,
            server,
        )
        job = api.fine_tuning.jobs.retrieve(long.id)
        assert job.status == "cancelled" and job.fine_tuned_model is None
        # The worker got SIGTERM, not SIGKILL: the trainer recorded the interruption itself.
        run = json.loads((data / "jobs" / long.id / "run.json").read_text())
        assert run["status"] == "interrupted"
        assert len(api.fine_tuning.jobs.list().data) == 2
    finally:
        server.stop()
