"""Start a real `tunery serve` process on a free loopback port (tests and the load benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    data_dir: Path
    api_key: str | None
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str | None = None, **kwargs):
        from openai import OpenAI

        return OpenAI(
            base_url=self.base_url, api_key=api_key or self.api_key or "none", max_retries=0, **kwargs
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no cleanup at all, as in a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def kill_mid_job(self, worker_pid: int, run_dir: Path, timeout: float = 180) -> None:
        """kill -9 this server while its worker is between its first checkpoint and its last step.

        The worker is frozen at its first checkpoint (`frozen_at_first_checkpoint`), the server is
        killed and reaped, and the worker goes on only after its parent watch's interval has passed:
        the watch's first look then sees the server gone while most steps are still ahead. Without the
        freeze a tiny model can finish every step before the watch looks (the job then succeeds and
        the test has not tested a kill mid-job)."""
        from tunery.jobs.worker import PARENT_WATCH_INTERVAL  # imports torch: only where used

        with frozen_at_first_checkpoint(worker_pid, run_dir, timeout, self.log):
            self.kill()
            time.sleep(PARENT_WATCH_INTERVAL * 1.5)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def frozen_at_first_checkpoint(worker_pid: int, run_dir: Path, timeout: float = 180, log=lambda: ""):
    """SIGSTOP a job's worker as soon as its first checkpoint lands, and SIGCONT it on leaving. What
    the block does to the job (a pause, a cancel, a server kill) then lands mid-job by construction:
    a tiny model can otherwise run all its steps between two polls of a test."""
    deadline = time.time() + timeout
    while not any((run_dir / "checkpoints").glob("step-*")):
        assert time.time() < deadline, f"no checkpoint in {timeout} s:\n{log()[-2000:]}"
        time.sleep(0.01)
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker_pid, signal.SIGCONT)


def start_server(
    data_dir: str | Path,
    api_key: str | None = "test-admin-key",
    *args: str,
    port: int | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Run `python -m tunery.serve` and wait until /healthz answers."""
    import httpx

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "tunery.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
        *args,
    ]
    if not any(a.endswith("allow-local-models") for a in args):
        cmd.append("--allow-local-models")  # tests train tiny models from temp dirs
    if api_key:
        cmd += ["--api-key", api_key]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("TUNERY_API_KEY", "TUNERY_DATABASE_URL")},
        **(env or {}),  # what the operator exported before `tunery serve` (tests of the worker's env)
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = ServerProcess(proc, port, data_dir, api_key, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not start in {timeout}s:\n{server.log()}")


@contextmanager
def running_server(
    data_dir: str | Path,
    api_key: str | None = "test-admin-key",
    *args: str,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    server = start_server(data_dir, api_key, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


def make_lora_adapter(
    base_dir: str | Path, out: str | Path, seed: int, r: int = 4, alpha: float = 64
) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it really changes the base's replies,
    saved as a trained run would save it (PEFT files plus tunery.json)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    (out / "tunery.json").write_text(
        json.dumps({"base_model": str(base_dir), "method": "lora", "objective": "sft", "method_options": {}})
    )
    return out


def register_model(data_dir: str | Path, api_key: str, name: str, base: str | Path, adapter: Path) -> Path:
    """Record an adapter as a fine-tuned model of `api_key`, as a finished job does; returns its new dir."""
    from tunery.jobs.store import Store
    from tunery.jobs.tables import ModelRow

    data_dir = Path(data_dir)
    store = Store(data_dir)
    try:
        owner = store.key_for(api_key).id
        rel = f"adapters/{adapter.name}"
        (data_dir / "adapters").mkdir(exist_ok=True)
        adapter.rename(data_dir / rel)
        store.add_model(ModelRow(name=name, owner=owner, base=str(base), path=rel, created_at=0))
    finally:
        store.close()
    return data_dir / rel
