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


def dataset_subset(path: Path, limit: int | None, out: Path) -> Path:
    """`path` itself, or its first `limit` records written to `out` (the quickstart's and the
    classifier demo's `--max-train` / `--max-test` cuts, which keep tests and benchmarks short)."""
    if limit is None:
        return path
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:limit]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
