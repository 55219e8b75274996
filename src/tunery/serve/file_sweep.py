"""Housekeeping of the files store: expired files, and temp entries a crash or a dropped download
left behind. `serve/files.py` runs `sweep` at startup and then every `SWEEP_EVERY_S`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from tunery.jobs.store import Store

log = logging.getLogger("tunery.serve")

# Temp files (uploads, validations, exports) untouched this long are leftovers of a crash or a
# dropped download; a live upload or export writes into its entry far more often than this.
TMP_GRACE_S = 3600
SWEEP_EVERY_S = 600


def sweep(store: Store, tmp_grace_s: float = TMP_GRACE_S) -> None:
    """Delete expired files and stale temp entries. Never raises: a failed sweep waits for the next."""
    try:
        expired = store.delete_expired_files()
        if expired:
            log.info("deleted %d expired file(s)", expired)
        clean_tmp(store.data_dir / "files" / ".tmp", tmp_grace_s)
    except Exception:  # a database or disk hiccup must not kill the server's housekeeping
        log.exception("file sweep failed")


def clean_tmp(folder: Path, older_than_s: float) -> list[str]:
    """Remove entries of `folder` (temp files, `export-*` dirs) not written for `older_than_s`;
    returns their names. Another process sharing the data dir may be writing the younger ones."""
    cutoff = time.time() - older_than_s
    removed = []
    for entry in list(folder.iterdir()) if folder.is_dir() else []:
        try:
            if _newest_mtime(entry) >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
        except FileNotFoundError:
            continue  # its owner finished and removed it meanwhile
    if removed:
        log.info("removed %d stale temp entr(ies) from %s", len(removed), folder)
    return removed


def _newest_mtime(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for root, dirs, files in os.walk(entry):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest
