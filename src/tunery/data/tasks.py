"""Task names of multi-task data, shared by training (validation tasks, train/run.py) and the held-out
comparison (evaluate/heldout.py), so a task is named the same way in both."""

from __future__ import annotations

from pathlib import Path


def file_task(path: Path) -> str:
    """A file's task name when several files are compared: `routing.test.jsonl` -> `routing`."""
    name = path.name.split(".")[0]
    return name or path.name
