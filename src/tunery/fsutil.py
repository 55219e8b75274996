"""Durable atomic file writes (the one helper every "write a temp file, rename it into place" uses),
and the file lock that makes a second process wait for the first instead of redoing its work.

`os.replace` is atomic, but the rename itself lives in the directory's metadata: until the directory
is fsynced, a power loss can bring back the old name (or none) even though the new file's bytes were
synced. So the file is fsynced before the rename and its directory after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has none: file_lock is a no-op there
    fcntl = None

log = logging.getLogger(__name__)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, creations) to disk; a no-op where directories cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and /proc-like mounts) refuse fsync on a directory
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, final: str | Path) -> None:
    """Rename a finished (already fsynced) temp file or directory onto `final`, then fsync the
    directory so the rename survives a crash."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so readers see the old or the new content, never a torn file, and the
    new content survives a crash once this returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path, doing: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (POSIX `flock`) while another process may be doing the same
    work; `doing` names that work in the log line a waiting process prints. A no-op where `flock` is
    missing (Windows), so callers must stay correct without it: each publishes its result with an
    atomic rename, and the first rename wins."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Another process is %s; waiting for it (%s)", doing, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
