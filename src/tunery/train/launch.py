"""Launching a run on several processes: the rank environment, the pre-launch checks, torchrun.

`tunery train --nproc N` checks the settings here, then re-runs itself under torchrun
(`launch_command`), forwards Ctrl-C/SIGTERM to it and reads rank 0's run.json for the outcome
(`launch`). Each launched process then joins the group through train/distributed.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunery.errors import ConfigError, TuneryError

# --------------------------------------------------------------------------- environment


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 writes the run directory, prints and reports; it is the only process without a launcher."""
    return rank() == 0


def launched() -> bool:
    """Inside a process torchrun (or another launcher) started as one of several ranks."""
    return world_size() > 1


LAUNCHER_ENV = "TUNERY_LAUNCHER"


def under_tunery_launcher() -> bool:
    """Started by `tunery train --nproc`, which reports the outcome, rather than by hand."""
    return os.environ.get(LAUNCHER_ENV) == "1"


# --------------------------------------------------------------------------- launching


class DistributedError(TuneryError):
    code = "distributed_training_failed"


def check(config: Any, *, cuda: bool | None = None) -> None:
    """Refuse settings this machine cannot run, before any process is launched."""
    import torch  # not at the top: train/run.py imports this module, `import tunery.train` stays light

    d = config.distributed
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.method == "qlora" and d.strategy != "ddp":
        # bitsandbytes' 4-bit weights are packed uint8 tensors with their quantization state on the
        # side: sharding splits them without that state, and ZeRO-3 cannot gather them back.
        raise ConfigError(
            f"method qlora cannot be sharded with distributed.strategy={d.strategy}.",
            hint="Use distributed.strategy=ddp (each GPU holds the whole 4-bit base), or method lora.",
            param="distributed.strategy",
        )

    if d.strategy == "deepspeed":
        if not cuda:
            raise ConfigError(
                "distributed.strategy=deepspeed needs CUDA GPUs.",
                hint="On CPU use distributed.strategy=ddp or fsdp.",
                param="distributed.strategy",
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "distributed.strategy=deepspeed needs the deepspeed package.",
                hint="pip install deepspeed (it compiles CUDA ops), or use distributed.strategy=fsdp.",
                param="distributed.strategy",
            )
    if d.backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend=nccl needs CUDA GPUs.", hint="Use backend: auto or gloo.")


def check_local_rank(local_rank: int, visible: int) -> None:
    """Each rank drives the GPU numbered by its LOCAL_RANK; fail clearly when there is no such GPU."""
    if local_rank >= visible:
        raise DistributedError(
            f"Rank with LOCAL_RANK={local_rank} has no GPU: this process sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}).",
            hint="Launch at most one process per visible GPU (--nproc <= the number of GPUs), "
            "or list more GPUs in CUDA_VISIBLE_DEVICES.",
        )


# How long torchrun waits, after passing on a Ctrl-C/SIGTERM, before it SIGKILLs the ranks. Its own
# default, 30 s, killed ranks still writing their interrupt checkpoint (finish the step, save the
# sharded state, gather the model to rank 0) on a loaded 2-core machine, leaving no run.json: the
# FSDP SIGTERM test's rare failure (issue 23). A big model's checkpoint takes minutes, so allow ten.
# The user's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, torchrun's own setting, wins.
SHUTDOWN_TIMEOUT_S = 600


def shutdown_timeout() -> int:
    """Seconds torchrun gives the ranks to stop after a signal (`SHUTDOWN_TIMEOUT_S`, or the user's
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT)."""
    raw = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    try:
        return int(raw) if raw else SHUTDOWN_TIMEOUT_S
    except ValueError:
        raise ConfigError(
            f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds, not {raw!r}."
        ) from None


def launch_command(
    train_args: list[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """torchrun running `tunery train <train_args>` on `nproc` processes of this node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        f"--shutdown-timeout={shutdown_timeout()}",
        "-m",
        "tunery.cli",
        "train",
        *train_args,
    ]


def launch(cmd: list[str], run_dir: Path, *, main_node: bool = True) -> str:
    """Run the launcher; return the run's status (succeeded | interrupted) or raise DistributedError.

    The launcher runs in its own session so a terminal Ctrl-C reaches it once, from here: torchrun
    passes the signal to every rank, which stops at the same step boundary and checkpoints. (torchrun
    then exits non-zero whatever the ranks did, so rank 0's run.json tells an interruption apart.)
    """
    started = time.time()
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, LAUNCHER_ENV: "1"})

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    status = None
    run_json = run_dir / "run.json"
    if main_node and run_json.exists() and run_json.stat().st_mtime >= started - 1:  # not a stale one
        status = json.loads(run_json.read_text()).get("status")
    if status == "interrupted" or (rc == 0 and status is not None):
        return status
    if rc == 0:
        return "succeeded"  # another node's view: rank 0 writes the run directory on its node
    if status == "failed":  # a user error, already printed by the ranks
        raise DistributedError("Training failed; the error is printed above.")
    raise DistributedError(
        f"Distributed training failed: the launcher exited with code {rc}.",
        hint="The failing rank's error is printed above (torchrun's summary names the rank).",
    )
