"""Which GPUs each local training worker may use, given to it as CUDA_VISIBLE_DEVICES.

Without this every worker sees every GPU and trains on cuda:0, so `--concurrency 2` puts two jobs
on one GPU (and out of memory). With GPUs present each worker gets `--gpus-per-job` of them (default
1) to itself, and the server refuses a concurrency its GPUs cannot give that many each.
"""

from __future__ import annotations

import os
import threading

from tunery.errors import TuneryError


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES when set, else every one torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch  # heavy: only when no CUDA_VISIBLE_DEVICES says which GPUs

    # device_count asks NVML and starts no CUDA context in the server process.
    return [str(i) for i in range(torch.cuda.device_count())]


class GpuSlots:
    """The GPUs held by each running job; `take` and `release` are called by the scheduler thread."""

    def __init__(self, gpus: list[str], per_job: int):
        self.gpus, self.per_job = list(gpus), per_job
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self.gpus) // self.per_job

    def take(self, job_id: str) -> list[str]:
        with self._lock:
            busy = {g for held in self._held.values() for g in held}
            free = [g for g in self.gpus if g not in busy]
            if len(free) < self.per_job:  # the concurrency check makes this a bug, not a user error
                raise TuneryError(f"No free GPU for job {job_id}: all {len(self.gpus)} are in use.")
            self._held[job_id] = free[: self.per_job]
            return self._held[job_id]

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)


def plan(concurrency: int, gpus: list[str], gpus_per_job: int | None) -> GpuSlots | None:
    """The slots for `concurrency` jobs of `gpus_per_job` GPUs each (None: no GPUs, CPU workers).

    Raises a TuneryError for what the GPUs here cannot give, before the server starts."""
    if not gpus:
        if gpus_per_job:
            raise TuneryError(
                f"--gpus-per-job {gpus_per_job} was given, but this server sees no GPU.",
                hint="Drop --gpus-per-job to train on the CPU, or check CUDA_VISIBLE_DEVICES and the driver.",
                code="invalid_config",
            )
        return None
    per_job = gpus_per_job or 1
    if per_job > len(gpus):
        raise TuneryError(
            f"--gpus-per-job {per_job} is more than the {len(gpus)} GPU(s) this server sees.",
            code="invalid_config",
        )
    slots = GpuSlots(gpus, per_job)
    if concurrency > slots.capacity:
        raise TuneryError(
            f"--concurrency {concurrency} needs {concurrency * per_job} GPUs at {per_job} per job, but this "
            f"server sees {len(gpus)} ({', '.join(gpus)}).",
            hint=f"Use --concurrency {slots.capacity} or less, or fewer --gpus-per-job.",
            code="invalid_config",
        )
    return slots
