"""The `ray` executor: each fine-tuning job runs as a Ray job (`tunery serve --executor ray`).

Scheduling, event following, recovery and concluding are the local executor's (jobs/executor.py);
only where the worker runs differs. `python -m tunery.jobs.worker --data-dir D JOB_ID` is submitted
through the Ray Jobs API with the job's CPUs and GPUs reserved for it. Events, checkpoints and
run.json are still read from the run dir, so the server and the Ray nodes must see the data dir
at the same path (one machine, or a shared filesystem).

Ray stops a job by sending SIGTERM to the worker and SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s
by default): we set that to the server's grace, so a cancelled trainer has time to checkpoint.
The submission id is `tunery-<job id>-<attempt>`, so a restarted server finds the Ray job again
from the job row alone; Ray jobs therefore keep training while the server restarts.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from pathlib import Path
from typing import Any

from tunery.errors import ExecutorError
from tunery.jobs.executor import Executor
from tunery.jobs.store import Store
from tunery.jobs.tables import Job

log = logging.getLogger("tunery.jobs")

# Passed on to the worker when the server has them set: the model cache and offline switches. The
# rest of the worker's environment is the Ray node's. No secret is ever forwarded (not the server's
# keys, nor its judges' keys): Ray shows a job's runtime_env on its dashboard.
FORWARDED_ENV = ("TUNERY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def connect(address: str) -> Any:
    """A `JobSubmissionClient` for a cluster's dashboard address, or an ExecutorError saying why not."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ExecutorError(
            "The ray executor needs Ray with its job server, which is not installed.",
            hint="pip install 'tunery[ray]' (it installs ray[default]).",
        ) from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError when nothing answers, ValueError for a bad address
        raise ExecutorError(
            f"Cannot reach the Ray cluster at {address!r}: {exc}",
            hint="Pass the Ray dashboard address (http://HEAD:8265) of a cluster started with "
            "`ray start --head`, with ray[default] installed on the head.",
        ) from None


def submission_id(job_id: str, attempt: int) -> str:
    return f"tunery-{job_id}-{attempt}"


def returncode(info: Any) -> tuple[int | None, str | None]:
    """(exit code, detail) from a Ray `JobDetails`/`JobInfo`; (None, None) while pending or running.

    Ray records no exit code for a stopped job; it stops with SIGTERM, so that reads as -SIGTERM.
    A failure without an exit code (runtime env setup, a lost node, no resources in time) has only
    Ray's message to explain it: its first line is the detail."""
    status = getattr(info.status, "value", info.status)
    if status in ("PENDING", "RUNNING"):
        return None, None
    if status == "SUCCEEDED":
        return 0, None
    lines = (info.message or "").strip().splitlines()
    detail = f"Ray: {lines[0][:300]}" if lines else None
    if status == "STOPPED":
        return -signal.SIGTERM, detail
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code), None  # the worker's own log tail says more than Ray's copy
    return 1, detail or "Ray reported the job failed."


def _missing(exc: Exception) -> bool:
    """True when Ray answered that it has no such job (its SDK raises a RuntimeError with the 404)."""
    return "does not exist" in str(exc) or "404" in str(exc)


class RayJob:
    """A `WorkerHandle` for one Ray job, known by its submission id."""

    pid: int | None = None

    def __init__(self, client: Any, sid: str, log_path: Path | None = None):
        self.client = client
        self.submission_id = sid
        self.log_path = log_path
        self.detail: str | None = None
        self._rc: int | None = None
        self._unreachable = False

    @classmethod
    def submit(
        cls,
        client: Any,
        entrypoint: str,
        sid: str,
        *,
        num_cpus: float,
        num_gpus: float,
        env: dict[str, str],
        grace: float,
        log_path: Path | None = None,
        metadata: dict[str, str] | None = None,
    ) -> RayJob:
        env = {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, int(grace)))}
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                entrypoint_num_cpus=num_cpus,
                entrypoint_num_gpus=num_gpus,
                runtime_env={"env_vars": env},
                metadata=metadata or {},
            )
        except Exception as exc:
            raise ExecutorError(f"The Ray cluster refused job {sid}: {exc}") from None
        return cls(client, sid, log_path)

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        try:
            info = self.client.get_job_info(self.submission_id)
        except Exception as exc:
            if _missing(exc):  # deleted, or the head restarted and forgot it: it will not report back
                self._rc, self.detail = 1, f"Ray no longer knows job {self.submission_id}."
                return self._rc
            if not self._unreachable:  # a dashboard hiccup: ask again next tick, warn once
                log.warning("cannot reach Ray for job %s: %s", self.submission_id, exc)
            self._unreachable = True
            return None
        self._unreachable = False
        self._rc, self.detail = returncode(info)
        return self._rc

    def terminate(self) -> None:
        try:
            self.client.stop_job(self.submission_id)
        except Exception as exc:  # the next kill() asks again
            log.warning("cannot stop Ray job %s: %s", self.submission_id, exc)

    def kill(self) -> None:
        # Ray itself SIGKILLs after RAY_JOB_STOP_WAIT_TIME_S; asking again covers a lost first stop.
        self.terminate()

    def close(self) -> None:
        """Append the job's output, which Ray keeps, to worker.log as a local worker's would be."""
        if self.log_path is None:
            return
        try:
            text = self.client.get_job_logs(self.submission_id)
        except Exception as exc:
            log.warning("cannot fetch the logs of Ray job %s: %s", self.submission_id, exc)
            return
        with open(self.log_path, "ab") as f:
            f.write(text.encode(errors="replace"))


class RayExecutor(Executor):
    """Workers are Ray jobs on the cluster at `address` (its dashboard URL)."""

    detach_on_stop = True

    def __init__(
        self,
        store: Store,
        address: str,
        concurrency: int = 1,
        grace: float = 30.0,
        poll: float = 0.5,
        database_url: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        env_allow: tuple[str, ...] = (),
    ):
        # `env_allow` (judges' keys, --worker-env) is not sent: Ray shows a job's runtime_env on its
        # dashboard, so secrets are set on the Ray nodes instead (docs/security.md).
        super().__init__(store, concurrency, grace=grace, poll=poll, database_url=database_url)
        self.address = address
        self.client = connect(address)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def _spawn(self, job: Job, run_dir: Path) -> RayJob:
        asked = (job.tunery or {}).get("resources") or {}
        cpus = float(asked.get("num_cpus", self.num_cpus))
        gpus = float(asked.get("num_gpus", self.num_gpus))
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if self.database_url:
            env["TUNERY_DATABASE_URL"] = self.database_url
        # `exec`: the worker replaces Ray's shell, so its parent is Ray's job supervisor, which lives
        # as long as the job does (the worker's parent watch then only fires if Ray loses it).
        data_dir = shlex.quote(str(self.store.data_dir))
        entrypoint = f"exec python -m tunery.jobs.worker --data-dir {data_dir} {shlex.quote(job.id)}"
        sid = submission_id(job.id, job.attempts)
        handle = RayJob.submit(
            self.client,
            entrypoint,
            sid,
            num_cpus=cpus,
            num_gpus=gpus,
            env=env,
            grace=self.grace,
            log_path=run_dir / "worker.log",
            metadata={"tunery_job": job.id, "attempt": str(job.attempts)},
        )
        message = f"Submitted to Ray as job {sid} ({cpus:g} CPUs, {gpus:g} GPUs)"
        self.store.update_job(job.id, events=[("info", message)])
        return handle

    def _reattach(self, job: Job) -> RayJob | None:
        sid = submission_id(job.id, job.attempts)
        try:
            self.client.get_job_info(sid)
        except Exception as exc:
            if _missing(exc):  # never submitted (the server died first) or forgotten: start again
                return None
            raise ExecutorError(f"Cannot ask Ray about job {sid} to recover it: {exc}") from None
        return RayJob(self.client, sid, self.store.path(job.run_dir) / "worker.log")
