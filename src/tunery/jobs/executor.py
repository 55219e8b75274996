"""The job executor: a queue of jobs, each run in a worker process, followed through its run dir.

One scheduler thread in the server process starts queued jobs up to `concurrency`, copies each
running job's `events.jsonl` rows (and checkpoint events) into the database, and on exit reads
`run.json` to finish the job. A worker that crashes or is OOM-killed only fails its own job.
Cancel and pause send SIGTERM (the trainer checkpoints and exits), then SIGKILL after a grace
period. On startup, jobs a dead server left `running` are requeued to resume from their last
checkpoint, or failed with the reason when their files are gone.

Where a worker runs is behind `WorkerHandle`: `LocalExecutor` (jobs/local.py) starts a subprocess here,
`RayExecutor` (jobs/ray_executor.py) submits a Ray job. Scheduling, event following, recovery
and concluding are this one implementation for both.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunery.errors import TuneryError
from tunery.jobs.outcome import latest_checkpoint, log_tail, record_success, run_status
from tunery.jobs.store import Store
from tunery.jobs.tables import Job, now
from tunery.redact import scrub_paths
from tunery.train.rundir import clear_status

log = logging.getLogger("tunery.jobs")


class WorkerHandle(Protocol):
    """What the scheduler needs of one launched worker, wherever it runs."""

    pid: int | None  # a local process id, recorded on the job row for recovery; None elsewhere
    detail: str | None  # why it ended, when the runner knows more than an exit code

    def poll(self) -> int | None:
        """None while it runs; then its exit code (negative: killed by that signal)."""
        ...

    def terminate(self) -> None:
        """SIGTERM: the trainer checkpoints and exits."""
        ...

    def kill(self) -> None:
        """SIGKILL, once the grace period is over."""
        ...

    def close(self) -> None:
        """After it ended: release what the handle holds; its output ends up in worker.log."""
        ...


@dataclass
class _Running:
    job_id: str
    handle: WorkerHandle
    started: float = field(default_factory=time.time)
    intent: str | None = None  # cancel | pause | shutdown: why we signalled it
    kill_at: float | None = None


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _pid_is_worker(pid: int, job_id: str) -> bool:
    """True when `pid` is still a worker of this job (pids are reused after a crash)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"tunery.jobs.worker" in cmd and job_id.encode() in cmd


class Executor:
    """The scheduler; subclasses say how a worker is started (`_spawn`) and found again after a
    server restart (`_reattach`)."""

    # True when workers outlive the server by design (a Ray cluster): a server stop leaves them
    # running and the next server re-attaches, instead of checkpointing them back to the queue.
    detach_on_stop = False

    def __init__(
        self,
        store: Store,
        concurrency: int = 1,
        grace: float = 30.0,
        poll: float = 0.5,
        database_url: str | None = None,
        env_allow: tuple[str, ...] = (),
    ):
        self.store = store
        self.concurrency = max(1, concurrency)
        self.grace = grace
        self.poll = poll
        # Called as (base spec, model dir) once a job's model is recorded: the server prepares what
        # serving it needs (its llama.cpp GGUF forms) before the first request asks.
        self.on_model: Callable[[str, Path], None] | None = None
        self.database_url = database_url
        self.env_allow = tuple(env_allow)  # variables workers may see beyond the allowlist (worker_env.py)
        self._running: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False  # set by stop(): requeued jobs must not be launched again

    # ---- lifecycle
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="tunery-executor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Graceful shutdown: running jobs checkpoint and go back to the queue to resume later
        (or, with `detach_on_stop`, keep running for the next server to re-attach)."""
        self._draining = True
        if not self.detach_on_stop:
            with self._lock:
                for r in self._running.values():
                    self._terminate(r, "shutdown")
            deadline = time.time() + self.grace
            while time.time() < deadline and any(
                r.handle.poll() is None for r in list(self._running.values())
            ):
                time.sleep(0.1)
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            for r in list(self._running.values()):
                if self.detach_on_stop and r.handle.poll() is None:
                    self._running.pop(r.job_id)  # the job row stays `running`; recover() finds it
                    continue
                if r.handle.poll() is None:
                    r.handle.kill()
                    deadline = time.time() + 10
                    while r.handle.poll() is None and time.time() < deadline:
                        time.sleep(0.05)
                self._finish(r)

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> None:
        """Requeue what a dead server left behind; stop orphaned workers first so no two processes
        ever train into the same run dir."""
        for job in self.store.list_jobs(statuses=("running", "validating_files"), oldest_first=True):
            if job.pid and _pid_is_worker(job.pid, job.id):
                self._stop_orphan(job.pid, job.id)
            handle = self._reattach(job) if job.status == "running" else None
            if handle is not None:  # its worker is still known to the runner: follow it again
                self._running[job.id] = _Running(job.id, handle)
                if handle.poll() is None:
                    message = "The server restarted during this job; it re-attached to its worker."
                    self.store.update_job(job.id, events=[("info", message)])
                continue  # an ended one is concluded by the next tick, from run.json and its exit
            self._follow(job.id)  # events the worker wrote while no server was watching
            if run_status(self.store.path(job.run_dir)) in ("succeeded", "failed"):
                self._conclude(job.id, None, None)  # it finished while the server was down
                continue
            reason = self._missing_files(job)
            if reason:
                self.store.update_job(
                    job.id,
                    status="failed",
                    finished_at=now(),
                    pid=None,
                    error={"code": "file_not_found", "message": reason, "param": "training_file"},
                    events=[("error", reason)],
                )
                continue
            self.store.update_job(
                job.id,
                status="queued",
                pid=None,
                resume=latest_checkpoint(self.store.path(job.run_dir)) is not None,
                events=[
                    (
                        "warn",
                        "The server restarted during this job; it was requeued and "
                        "resumes from its last checkpoint.",
                    )
                ],
            )

    def _spawn(self, job: Job, run_dir: Path) -> WorkerHandle:
        """Start `python -m tunery.jobs.worker --data-dir D JOB_ID` somewhere."""
        raise NotImplementedError

    def _worker_exited(self, job_id: str) -> None:
        """A worker is gone (finished, failed or killed): what it held is free again."""

    def _reattach(self, job: Job) -> WorkerHandle | None:
        """The handle of a worker a previous server launched for this job, if it can be found."""
        return None

    def _stop_orphan(self, pid: int, job_id: str) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + self.grace
            while time.time() < deadline and _pid_is_worker(pid, job_id):
                time.sleep(0.1)
            if _pid_is_worker(pid, job_id):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _missing_files(self, job: Job) -> str | None:
        for file_id in (job.training_file, job.validation_file):
            if not file_id:
                continue
            try:
                row = self.store.get_file(job.owner, file_id)
            except Exception:
                return f"The job cannot resume: its file {file_id} was deleted."
            if not self.store.path(row.path).is_file():
                return f"The job cannot resume: the bytes of file {file_id} are missing from the data dir."
        return None

    # ---- control
    def cancel(self, job_id: str) -> None:
        with self._lock:
            r = self._running.get(job_id)
            if r:
                self._terminate(r, "cancel")

    def pause(self, job_id: str) -> None:
        with self._lock:
            r = self._running.get(job_id)
            if r:
                self._terminate(r, "pause")

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._running

    def _terminate(self, r: _Running, intent: str) -> None:
        r.intent = r.intent or intent
        if r.handle.poll() is None:
            r.handle.terminate()
            r.kill_at = time.time() + self.grace

    # ---- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # a database hiccup must not kill the scheduler
                log.exception("executor tick failed")
            self._wake.wait(self.poll)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            for r in list(self._running.values()):
                self._follow(r.job_id)
                if r.handle.poll() is not None:
                    self._follow(r.job_id)
                    self._finish(r)
                elif r.kill_at and time.time() > r.kill_at:
                    log.warning("job %s ignored SIGTERM for %.0fs; killing it", r.job_id, self.grace)
                    r.kill_at = None
                    r.handle.kill()
            if self._stop.is_set() or self._draining:
                return
            free = self.concurrency - len(self._running)
            if free <= 0:
                return
            for job in self.store.list_jobs(statuses=("queued",), oldest_first=True):
                if free <= 0:
                    break
                if job.id not in self._running:
                    self._launch(job)
                    free -= 1

    def _launch(self, job: Job) -> None:
        run_dir = self.store.path(job.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_status(run_dir)  # a stale run.json would be read as this attempt's end
        ckpt = latest_checkpoint(run_dir) if job.resume else None
        # The trainer itself announces "Fine-tuning job started"; this records the worker launch.
        message = (
            f"Worker started; resuming from checkpoint {ckpt.name}"
            if ckpt
            else f"Worker started (attempt {job.attempts + 1})"
        )
        started = self.store.update_job(
            job.id,
            expect=("queued",),
            status="running",
            resume=ckpt is not None,
            started_at=job.started_at or now(),
            attempts=job.attempts + 1,
            events=[("info", message)],
        )
        if started is None:  # cancelled meanwhile
            return
        job = started
        try:
            handle = self._spawn(job, run_dir)
        except Exception as exc:  # the runner refused it (say, a Ray cluster gone): fail only this job
            if not isinstance(exc, TuneryError):
                log.exception("starting the worker of job %s failed", job.id)
                exc = TuneryError(f"The job could not be started: {type(exc).__name__}: {exc}")
            self._fail(job, {"code": "worker_not_started", "message": exc.message, "param": None})
            return
        self.store.update_job(job.id, pid=handle.pid)
        self._running[job.id] = _Running(job.id, handle)

    def _follow(self, job_id: str) -> None:
        """Copy new complete lines of events.jsonl into the database."""
        job = self.store.get_job(None, job_id)
        path = self.store.path(job.run_dir) / "events.jsonl"
        try:
            size = path.stat().st_size
        except OSError:
            return
        offset = job.events_offset
        rewritten = size < offset
        if rewritten:  # the trainer started the file over: re-read it and skip what we already hold
            offset = 0
        if size == offset:
            return
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size - offset)
        end = data.rfind(b"\n")
        if end < 0:
            return
        events, checkpoints = [], []
        for line in data[: end + 1].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if rewritten and self.store.has_event(
                job.id, int(row.get("created_at") or 0), str(row.get("message"))
            ):
                continue
            d = row.get("data") or {}
            if d.get("kind") == "checkpoint" and d.get("path"):
                step = int(d.get("step", 0))
                name = f"{job.output_name}:ckpt-step-{step}"
                checkpoints.append(
                    {
                        "step": step,
                        "metrics": d.get("metrics"),
                        "model_name": name,
                        "path": f"{job.run_dir}/{d['path']}/model",
                    }
                )
                row = {**row, "message": f"Checkpoint created at step {step} with Snapshot ID: {name}"}
            elif d.get("kind") == "model":  # the trainer names a path; clients know the model by name
                row = {**row, "message": f"New fine-tuned model created: {job.output_name}"}
            events.append(row)
        self.store.ingest(job, events, checkpoints, events_offset=offset + end + 1)
        if checkpoints:
            self.store.prune_checkpoints(job.id)

    def _finish(self, r: _Running) -> None:
        self._running.pop(r.job_id, None)
        r.handle.close()
        self._worker_exited(r.job_id)
        self._conclude(r.job_id, r.intent, r.handle.poll(), r.handle.detail)

    def _conclude(self, job_id: str, intent: str | None, rc: int | None, detail: str | None = None) -> None:
        """Record how a worker ended: from run.json, what we asked of it (intent), its exit code."""
        job = self.store.get_job(None, job_id)
        run_dir = self.store.path(job.run_dir)
        try:
            result = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            result = None
        status = (result or {}).get("status")
        if intent == "cancel":
            self.store.update_job(
                job.id,
                pid=None,
                finished_at=job.finished_at or now(),
                events=[("info", "Fine-tuning job cancelled; its last checkpoint is kept.")],
            )
        elif status == "succeeded" and intent in (None, "pause", "shutdown"):
            self._succeed(job, result)  # it finished before the pause or shutdown took effect
        elif intent == "pause":
            self.store.update_job(job.id, pid=None, resume=True, events=[("info", "Fine-tuning job paused")])
        elif intent == "shutdown":
            self.store.update_job(
                job.id,
                expect=("running",),
                status="queued",
                pid=None,
                resume=True,
                events=[
                    (
                        "info",
                        "The server is stopping; the job will resume from its "
                        "last checkpoint when it restarts.",
                    )
                ],
            )
        elif status == "failed":
            err = result.get("error") or {}
            error = {
                "code": err.get("code") or "training_failed",
                "message": err.get("message") or "Training failed.",
                "param": err.get("param"),
            }
            self._fail(job, error)
        else:
            if rc is not None and rc < 0:
                why = f"was killed by {_signal_name(rc)}"
                if rc == -signal.SIGKILL:
                    why += " (most likely out of memory)"
            else:
                why = f"exited with code {rc} without a result"
            # The worker's output stays in the server's log: it may hold paths, environment
            # details or another library's internals that are not the client's to read.
            log.error("job %s: worker %s; last output: %s", job.id, why, log_tail(run_dir / "worker.log"))
            message = f"The training process {why}." + (f" {detail}" if detail else "")
            self._fail(job, {"code": "worker_crashed", "message": message, "param": None})

    def _succeed(self, job: Job, result: dict[str, Any]) -> None:
        record_success(self.store, job, result, self.on_model)

    def _fail(self, job: Job, error: dict[str, Any]) -> None:
        # The client reads job.error and its event: no server paths there; the log keeps them.
        log.info("job %s failed: %s", job.id, error.get("message"))
        error = {**error, "message": scrub_paths(str(error.get("message") or ""))}
        self.store.update_job(
            job.id,
            expect=("running",),
            status="failed",
            pid=None,
            finished_at=now(),
            error=error,
            events=[("error", error["message"])],
        )
