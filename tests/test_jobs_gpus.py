"""Local workers each get their own GPUs (CUDA_VISIBLE_DEVICES), checked with a given GPU list."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from tunery.errors import TuneryError
from tunery.jobs.gpus import GpuSlots, plan
from tunery.jobs.local import LocalExecutor
from tunery.jobs.store import Store
from tunery.jobs.tables import Job, new_id, now


def test_plan_refuses_more_jobs_than_the_gpus_can_hold():
    assert plan(4, [], None) is None  # no GPU: CPU workers, any concurrency
    assert plan(2, ["0", "1"], None).per_job == 1
    assert plan(2, ["0", "1", "2", "3"], 2).capacity == 2
    with pytest.raises(
        TuneryError, match=r"--concurrency 3 needs 3 GPUs at 1 per job, but this server sees 2"
    ):
        plan(3, ["0", "1"], None)
    with pytest.raises(TuneryError, match="--concurrency 3 needs 6 GPUs at 2 per job") as err:
        plan(3, ["0", "1", "2", "3"], 2)
    assert "--concurrency 2 or less" in str(err.value)
    with pytest.raises(TuneryError, match="sees no GPU"):
        plan(1, [], 1)
    with pytest.raises(TuneryError, match="more than the 2 GPU"):
        plan(1, ["0", "1"], 4)


def test_slots_are_disjoint_and_freed_on_release():
    slots = GpuSlots(["3", "5", "6", "7"], 2)
    assert slots.take("a") == ["3", "5"] and slots.take("b") == ["6", "7"]
    with pytest.raises(TuneryError):
        slots.take("c")
    slots.release("a")
    assert slots.take("c") == ["3", "5"]


def _queued_job(store: Store) -> Job:
    upload = store.save_file("key_a", "t.jsonl", "fine-tune", io.BytesIO(b"{}\n"))
    job_id = new_id("ftjob-")
    job = Job(
        id=job_id,
        owner="key_a",
        status="queued",
        model="m",
        training_file=upload.id,
        seed=1,
        hyperparameters={},
        method={"type": "supervised"},
        tunery={"base_spec": "/nonexistent/base"},
        output_name=f"ft:base:alice::{job_id[-8:]}",
        run_dir=f"jobs/{job_id}",
        created_at=now(),
        result_files=[],
        events_offset=0,
        attempts=0,
        resume=False,
        pid=None,
    )
    store.add_job(job)
    return job


def _visible_devices(pid: int) -> str | None:
    """CUDA_VISIBLE_DEVICES as the worker process itself sees it. Popen returns once the child's exec
    has closed its close-on-exec pipe, a moment before the kernel sets the new image's environment:
    /proc/PID/environ reads empty until then (seen once on a loaded machine), so wait for it."""
    deadline = time.time() + 30
    while not (environ := Path(f"/proc/{pid}/environ").read_bytes()):
        assert time.time() < deadline, f"worker {pid} showed no environment for 30 s"
        time.sleep(0.01)
    for item in environ.split(b"\0"):
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


def test_each_worker_process_sees_only_its_own_gpus(tmp_path):
    store = Store(tmp_path / "data")
    executor = LocalExecutor(store, concurrency=2, gpus=["0", "1", "2", "3"], gpus_per_job=2, poll=0.05)
    jobs = [_queued_job(store) for _ in range(3)]
    try:
        executor._tick()  # starts two workers; the third job waits for GPUs
        running = dict(executor._running)
        assert len(running) == 2
        (waiting,) = {j.id for j in jobs} - set(running)
        devices = {job_id: _visible_devices(r.handle.pid) for job_id, r in running.items()}
        assert sorted(devices.values()) == ["0,1", "2,3"]
        # The worker on GPUs 0,1 ends: they are the lowest free ones whatever the other worker does.
        done = next(job_id for job_id, d in devices.items() if d == "0,1")
        running[done].handle.kill()
        deadline = time.time() + 60
        while waiting not in executor._running and time.time() < deadline:
            executor._tick()  # the finished worker's GPUs go to the waiting job
            time.sleep(0.05)
        assert _visible_devices(executor._running[waiting].handle.pid) == devices[done]
    finally:
        for r in list(executor._running.values()):
            r.handle.kill()
            r.handle.close()


def test_no_gpus_sets_no_visible_devices(tmp_path):
    store = Store(tmp_path / "data")
    executor = LocalExecutor(store, concurrency=3, gpus=[])
    assert executor.gpus is None
