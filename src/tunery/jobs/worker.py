"""One fine-tuning job in its own process: `python -m tunery.jobs.worker --data-dir D JOB_ID`.

It reads its job row, builds the `TuneryConfig` and calls the same `tunery.train.run` as the CLI.
It never writes to the database: the server follows the run dir (events.jsonl, run.json). A crash
here (even an OOM kill) only ends this process; the server sees the exit and fails the job.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from tunery.errors import TuneryError
from tunery.jobs.spec import build_config
from tunery.jobs.store import Store
from tunery.quiet import quiet_libraries
from tunery.train import run
from tunery.train.rundir import write_status

# Seconds between the worker's looks at its parent: how long it trains on with no server.
PARENT_WATCH_INTERVAL = 1.0


def watch_parent(interval: float = PARENT_WATCH_INTERVAL) -> None:
    """If the server dies (even kill -9), stop like a cancel: SIGTERM ourselves so the trainer
    checkpoints and exits, and the restarted server can resume the job without a second writer."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunery.jobs.worker")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--database-url", default=os.environ.get("TUNERY_DATABASE_URL"))
    parser.add_argument("job_id")
    args = parser.parse_args(argv)

    quiet_libraries()  # the job's log is read by people on the dashboard: same noise rules as the CLI
    store = Store(args.data_dir, args.database_url)
    job = store.get_job(None, args.job_id)
    run_dir = store.path(job.run_dir)
    try:
        train_file = store.get_file(job.owner, job.training_file)
        valid_file = store.get_file(job.owner, job.validation_file) if job.validation_file else None
        config = build_config(
            job,
            store.data_dir,
            store.path(train_file.path),
            store.path(valid_file.path) if valid_file else None,
        )
        store.close()  # training can take hours; hold no database connection meanwhile
        watch_parent()
        run(config)
        return 0
    except TuneryError as exc:
        if not _recorded_failure(run_dir):
            # a failure the trainer could not record itself (bad config, import errors)
            write_status(
                run_dir, "failed", error={"code": exc.code, "message": exc.message, "param": exc.param}
            )
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an environment failure: keep the traceback in worker.log
        traceback.print_exc()
        if not _recorded_failure(run_dir):
            write_status(
                run_dir,
                "failed",
                error={
                    "code": "internal_error",
                    "param": None,
                    "message": f"Training failed: {type(exc).__name__}: {exc}",
                },
            )
        return 1


def _recorded_failure(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") in ("failed", "interrupted")
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
