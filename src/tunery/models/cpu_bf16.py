"""Whether `precision: auto` computes in bf16 on this CPU: measured, not assumed.

A CPU without native bf16 (AVX512-BF16 or AMX in `/proc/cpuinfo`) runs bf16 matmuls through a scalar
fallback about a hundred times slower than fp32, so it never uses bf16 and nothing is measured. Native is
not the same as faster: on a 2-core Xeon with AVX512-BF16 but no AMX the bf16 matmul peak measured
157-165 GFLOPS against 263-331 for fp32, and a 1.2B LoRA run trained at 17.4 tokens/s under bf16
autocast against 35.6 in fp32. So on a CPU with the flags the first use times square matmuls at the
widths training multiplies, in both dtypes (`bf16_speedup`, well under a second), and bf16 is used only
where it ran at least `MIN_SPEEDUP` times as fast as fp32.

The answer is kept for the process and in `$TUNERY_CACHE/cpu-bf16.json`, keyed by the CPU's model name,
its flags and the torch version, so later runs do not measure again (delete the file to re-measure).
`TUNERY_CPU_BF16=1` or `0` overrides all of it: bf16 or fp32, no flags read, nothing measured.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from tunery.cpu import cpu_identity, cpuinfo
from tunery.errors import ConfigError
from tunery.fsutil import file_lock, write_atomic
from tunery.models.gguf import cache_root

log = logging.getLogger(__name__)

CPU_BF16_ENV = "TUNERY_CPU_BF16"
MIN_SPEEDUP = 1.2  # bf16 must win clearly: a near tie is not worth its rounding
# (size, runs) of the square matmuls timed in each dtype, at the widths training multiplies: the first
# size's first run warms oneDNN up (its best run counts); the large one runs once, and dominates the sum.
PROBE = ((1024, 3), (2048, 1))
CACHE_FILE = "cpu-bf16.json"


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 is emulated.
    Necessary for bf16 to pay on a CPU, not sufficient: `auto_bf16_on_cpu` decides."""
    flags = cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_bf16_on_cpu() -> bool:
    """Whether `precision: auto` and inference autocast compute in bf16 on this CPU: the one place
    that answers it. `TUNERY_CPU_BF16` (1 or 0) wins; else a CPU without native bf16 never does (no
    probe); else bf16 where it was measured at least `MIN_SPEEDUP` times as fast as fp32."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError(
                f"{CPU_BF16_ENV}={forced!r} is not 1 or 0",
                hint=f"1 computes `auto` precision on the CPU in bf16, 0 in fp32; unset {CPU_BF16_ENV} "
                "to use bf16 only where it is measured faster",
                param=CPU_BF16_ENV,
            )
        return forced == "1"
    return cpu_has_bf16() and bf16_measured_faster()


@functools.cache
def bf16_measured_faster() -> bool:
    """`bf16_speedup() >= MIN_SPEEDUP` on this CPU, read from the disk cache or measured (and kept)
    once; a lock makes concurrent processes (CPU ranks of one run) wait for one measurement."""
    key, about = _cpu_key()
    path = cache_root() / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(f".{CACHE_FILE}.lock"), "measuring bf16 on this CPU"):
            return _cached_or_measured(path, key, about)
    except OSError as e:  # no writable cache directory: measure for this process only
        log.warning("Cannot use %s (%s); measuring bf16 for this process only", path, e)
        return bool(_measure(about)["bf16"])


def _cached_or_measured(path: Path, key: str, about: dict[str, str]) -> bool:
    entries = _read_entries(path)
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("bf16"), bool):
        return hit["bf16"]
    entries[key] = _measure(about)
    try:
        write_atomic(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("Cannot keep the bf16 measurement in %s (%s); the next process measures again", path, e)
    return bool(entries[key]["bf16"])


def _read_entries(path: Path) -> dict[str, Any]:
    """The cache file's entries by key; {} for a missing or unreadable file (measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cpu_key() -> tuple[str, dict[str, str]]:
    """(cache key, what it stands for): a digest of the CPU's model name, flags and torch's version."""
    cpu, flags = cpu_identity()
    about = {"cpu": cpu, "torch": torch.__version__}
    identity = "|".join((cpu, flags, about["torch"]))
    return hashlib.sha256(identity.encode()).hexdigest()[:16], about


def _measure(about: dict[str, str]) -> dict[str, Any]:
    """Run the probe: the cache entry for this CPU."""
    start = time.perf_counter()
    speedup = bf16_speedup()
    bf16 = speedup >= MIN_SPEEDUP
    log.info(
        "bf16 matmuls ran %.2fx as fast as fp32 on this CPU (%s): `auto` precision computes in %s here "
        "(%s=1 or 0 overrides)",
        speedup,
        about["cpu"],
        "bf16" if bf16 else "fp32",
        CPU_BF16_ENV,
    )
    return {
        **about,
        "bf16": bf16,
        "speedup": round(speedup, 3),
        "probe_ms": round((time.perf_counter() - start) * 1000),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def bf16_speedup(probe: tuple[tuple[int, int], ...] = PROBE) -> float:
    """fp32 seconds over bf16 seconds for square matmuls on the CPU (above 1: bf16 is faster), summed
    over `probe`'s (size, runs), each size's best run counting. fp32 and bf16 alternate so a change in
    the machine's load hits both; autocast is off, so the fp32 products really are fp32."""
    dtypes = (torch.float32, torch.bfloat16)
    seconds = dict.fromkeys(dtypes, 0.0)
    largest = max(n for n, _ in probe)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        a, b = torch.rand(largest, largest, generator=gen), torch.rand(largest, largest, generator=gen)
        for n, runs in probe:
            operands = {dt: (a[:n, :n].to(dt).contiguous(), b[:n, :n].to(dt).contiguous()) for dt in dtypes}
            best = dict.fromkeys(dtypes, math.inf)
            for _ in range(runs):
                for dt, (x, y) in operands.items():
                    t0 = time.perf_counter()
                    torch.mm(x, y)
                    best[dt] = min(best[dt], time.perf_counter() - t0)
            for dt in dtypes:
                seconds[dt] += best[dt]
    return seconds[torch.float32] / seconds[torch.bfloat16]
