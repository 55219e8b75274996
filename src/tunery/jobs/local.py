"""Workers as subprocesses of this server (`tunery serve`'s default executor): each in its own
session, with GPUs of its own where there are GPUs (jobs/gpus.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunery.jobs.executor import Executor, WorkerHandle
from tunery.jobs.gpus import plan as plan_gpus
from tunery.jobs.gpus import visible_gpus
from tunery.jobs.store import Store
from tunery.jobs.tables import Job
from tunery.jobs.worker_env import worker_env


class LocalProcess:
    """A worker subprocess of this server, in its own session (so killpg reaches its children)."""

    detail: str | None = None

    def __init__(self, proc: subprocess.Popen, log_file: Any):
        self.proc = proc
        self.pid: int | None = proc.pid
        self.log_file = log_file

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.log_file.close()


class LocalExecutor(Executor):
    """Workers are subprocesses of this server, each with GPUs of its own where there are GPUs
    (jobs/gpus.py); `gpus` defaults to the GPUs this process sees."""

    def __init__(
        self, store: Store, *, gpus_per_job: int | None = None, gpus: list[str] | None = None, **kwargs: Any
    ):
        super().__init__(store, **kwargs)
        self.gpus = plan_gpus(self.concurrency, visible_gpus() if gpus is None else gpus, gpus_per_job)

    def _worker_exited(self, job_id: str) -> None:
        if self.gpus is not None:
            self.gpus.release(job_id)

    def _spawn(self, job: Job, run_dir: Path) -> WorkerHandle:
        cmd = [sys.executable, "-m", "tunery.jobs.worker", "--data-dir", str(self.store.data_dir), job.id]
        # An allowlist of this process's environment, never all of it: workers run what requests ask.
        env = worker_env(self.database_url, self.env_allow)
        if self.gpus is not None:  # this job's own GPUs; it sees them as cuda:0, cuda:1, ...
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus.take(job.id))
        try:
            return self._popen(cmd, env, run_dir)
        except BaseException:
            self._worker_exited(job.id)
            raise

    def _popen(self, cmd: list[str], env: dict[str, str], run_dir: Path) -> WorkerHandle:
        log_file = open(run_dir / "worker.log", "ab")
        # A new session: a Ctrl-C in the server's terminal reaches the server, which decides.
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        return LocalProcess(proc, log_file)
