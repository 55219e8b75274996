"""The arithmetic of bench/time_to_quality.py: what "minutes to target" counts, and the Trainer ratio.

Pure functions on recorded epoch rows, so this runs in milliseconds; the benchmark itself trains real
models and is run by hand (`python bench/time_to_quality.py --tiny` for a smoke run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import time_to_quality as ttq  # noqa: E402


def rows(*epochs: tuple[float, float, float], target: float = 0.95) -> list[dict]:
    """Epoch rows as the child writes them: (cumulative training seconds, eval seconds, accuracy)."""
    return [
        {"epoch": i, "train_seconds": t, "eval_seconds": e, "accuracy": a, "reached": a >= target}
        for i, (t, e, a) in enumerate(epochs, 1)
    ]


def test_minutes_to_target_count_every_evaluation_up_to_the_first_hit() -> None:
    # Training is cumulative; evaluations are not, and each one was needed to know: 30 + 40 + 50 s.
    hit = ttq.to_target(rows((600, 30, 0.80), (1200, 40, 0.96), (1800, 50, 0.99)))
    assert hit == {"epoch": 2, "minutes": round((1200 + 30 + 40) / 60, 2), "train_minutes": 20.0}
    assert ttq.to_target(rows((600, 30, 0.80), (1200, 40, 0.90))) is None


def test_ratio_to_the_trainer_only_when_both_reached_the_target() -> None:
    results = {
        "tunery-auto": {"to_target": ttq.to_target(rows((120, 30, 0.97)))},
        "tunery-recommend": {"to_target": None},
        "trainer": {"to_target": ttq.to_target(rows((270, 30, 0.96)))},
    }
    ttq.compare(results)
    assert results["tunery-auto"]["vs_trainer"] == 0.5  # 150 s against 300 s
    assert results["tunery-recommend"]["vs_trainer"] is None
    assert results["trainer"]["vs_trainer"] is None
    no_reference = {
        "tunery-auto": {"to_target": ttq.to_target(rows((60, 6, 1.0)))},
        "trainer": {"to_target": None},
    }
    ttq.compare(no_reference)
    assert no_reference["tunery-auto"]["vs_trainer"] is None
