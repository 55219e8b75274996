"""Where the bundled datasets live (the repo's `datasets/`, shipped beside the package)."""

from __future__ import annotations

from pathlib import Path

from tunery.errors import TuneryError


def datasets_dir() -> Path:
    here = Path(__file__).resolve()
    for candidate in (here.parent / "_datasets", here.parents[2] / "datasets"):
        if (candidate / "sentiment").is_dir():
            return candidate
    raise TuneryError(
        "The bundled datasets were not found.",
        hint="Install Tunery from its source tree: ./scripts/install.sh",
    )


def dataset_file(name: str, split: str) -> Path:
    path = datasets_dir() / name / f"{split}.jsonl"
    if not path.exists():
        raise TuneryError(f"Bundled dataset {name}/{split}.jsonl is missing.")
    return path
