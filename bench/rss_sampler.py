"""The RSS of a process tree, sampled from outside it every few seconds (bench/soak.py).

A process's own counters miss its children (the server's job workers) and whatever happens before
its loop starts or after it ends (loading, saving); this reads them all, with psutil where installed
and from /proc otherwise, and notes which allocator each process really runs on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # optional: /proc is read directly without it
    psutil = None


def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # the name in (...) may hold spaces
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _proc_rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def tree_rss(pid: int) -> dict[int, float]:
    """RSS in MB of `pid` and of all its descendants now ({} once it has exited). A process that is
    exiting has already handed back its memory and reads 0: it is left out, not counted as a drop."""
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        out = {}
        for p in procs:
            try:
                out[p.pid] = p.memory_info().rss / 1e6
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # exited between the listing and the read
        return {p: mb for p, mb in out.items() if mb > 0}
    kids, todo, out = _proc_children(), [pid], {}
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        rss = _proc_rss_mb(p)
        if rss:
            out[p] = rss
    return out


def process_info(pid: int) -> dict[str, Any]:
    """What runs as `pid` and on which allocator: jemalloc when its library is mapped, whatever
    LD_PRELOAD and MALLOC_CONF say (a preload that failed shows as "system")."""
    info: dict[str, Any] = {"allocator": "system"}
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        info["command"] = " ".join(c.decode(errors="replace") for c in cmd[:6] if c)
        if "libjemalloc" in Path(f"/proc/{pid}/maps").read_text():
            info["allocator"] = "jemalloc"
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        conf = [e.decode(errors="replace") for e in env if e.startswith(b"MALLOC_CONF=")]
        info["malloc_conf"] = conf[0].partition("=")[2] if conf else None
    except OSError:
        pass  # exited, or not ours to read
    return info


class Sampler:
    """Samples the RSS of a process tree every `interval` seconds in a thread, with the progress
    (steps done, requests answered) that `progress()` reports at that moment."""

    def __init__(self, pid: int, progress: Callable[[], float], interval: float) -> None:
        self.pid, self.progress, self.interval = pid, progress, interval
        self.samples: list[dict[str, Any]] = []
        self.processes: dict[str, dict[str, Any]] = {}
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        procs = tree_rss(self.pid)
        if self.pid not in procs:
            return  # not started yet, or exiting: its 0 MB would read as memory given back
        for pid in procs:  # re-read: the training process re-executes itself onto jemalloc
            info = process_info(pid)
            if info.get("command"):  # an exiting process shows an empty command line and no maps
                self.processes[str(pid)] = info
        self.samples.append(
            {
                "t": round(time.monotonic() - self._t0, 1),
                "x": self.progress(),
                "total_mb": round(sum(procs.values()), 1),
                "root_mb": round(procs.get(self.pid, 0.0), 1),
                "procs": {str(p): round(mb, 1) for p, mb in procs.items()},
            }
        )
