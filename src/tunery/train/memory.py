"""Run training processes on jemalloc where the machine has it.

PyTorch's CPU allocator is plain `malloc`. With glibc, activation buffers of varying sizes come from
a heap that fragments and never shrinks: a SmolLM2-135M LoRA run's peak RSS reached ~7 GB while its
live tensors stayed near 4.5 GB. jemalloc reuses freed blocks by size class without that
fragmentation. Intel's CPU launchers (`torch.backends.xeon.run_cpu`, `ipexrun`) preload it for the
same reason. jemalloc keeps its default page decay: on 150 varied smollm2 steps it held RSS flat at
1.2 GB and ran ~85 s, against glibc's 1.2 GB and ~88 s (docs/performance.md, the jemalloc note).

jemalloc must be loaded before the process starts, so the training commands re-execute themselves
once with LD_PRELOAD set (`maybe_reexec`), and processes Tunery spawns get the same environment
(`allocator_env`). TUNERY_ALLOCATOR=system turns this off.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "TUNERY_ALLOCATOR"  # "jemalloc" (the default where found) or "system"
# jemalloc's own decay (freed pages go back to the OS after ~10 s, by a background thread). An earlier
# `dirty_decay_ms:-1,muzzy_decay_ms:-1` kept every freed page forever: steps of varying shapes never reuse
# them, and a 900-step smollm2 run grew ~55 MB a step until it held the machine's 24 GB (issue #20).
# tests/test_memory.py::test_training_rss_stays_flat guards this on a few hundred varied steps.
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto"
_SEARCH = [
    f"{sys.prefix}/lib",
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
]


def find_jemalloc() -> str | None:
    """Path of a jemalloc shared library on this machine (Debian/Ubuntu: `apt install libjemalloc2`)."""
    if not sys.platform.startswith("linux"):
        return None
    for directory in _SEARCH:
        found = sorted(glob.glob(f"{directory}/libjemalloc.so*"))
        if found:
            return found[0]
    return None


def active_allocator() -> str:
    """ "jemalloc" when this process runs on it, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def allocator_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with jemalloc preloaded, unless turned off or not found."""
    env = dict(os.environ if env is None else env)
    if env.get(ALLOCATOR_ENV, "jemalloc") == "system" or "libjemalloc" in env.get("LD_PRELOAD", ""):
        return env
    lib = find_jemalloc()
    if lib is None:
        return env
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident memory now, in MB (0.0 where /proc is missing): cheap enough per step."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def maybe_reexec(argv: list[str]) -> None:
    """Replace this process with `python -m tunery.cli *argv` on jemalloc, when that applies.

    Returns (doing nothing) when jemalloc is already loaded, turned off or not installed. The marker
    variable stops a loop if the preload silently fails.
    """
    if os.environ.get("_TUNERY_REEXEC") or active_allocator() == "jemalloc":
        return
    env = allocator_env()
    if "libjemalloc" not in env.get("LD_PRELOAD", ""):
        return
    env["_TUNERY_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunery.cli", *argv], env)
