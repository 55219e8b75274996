"""bench/model_scale.py end to end on the tiny shape: lora and qlora, two steps each, into tmp_path.

The real figures (the ~1.2B llama-1b shape, docs/bench/model_scale.{json,md}) are measured by hand;
this checks that every column the table publishes is produced and sane, and that the qlora base the
run trained really is bitsandbytes 4-bit. It writes `model_scale_tiny.*` under tmp_path only.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "model_scale.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_shape_measures_lora_and_qlora(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "2", "--peak-seconds", "0.2"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "model_scale.json").exists()  # the real figures' name is never written here
    report = json.loads((tmp_path / "model_scale_tiny.json").read_text())
    assert report["shape"] == "tiny" and report["parameters"] > 0
    assert report["peak_gflops"]["fp32"] > 0 and "flags" in report["machine"]["cpu"]
    assert report["mean_example_tokens"] > 0
    results = report["results"]
    assert set(results) == {"lora", "qlora"}
    for method, r in results.items():
        assert "error" not in r, (method, r.get("stderr_tail", "")[-2000:])
        assert r["steps"] == 2 and len(r["step_seconds"]) == 2
        assert r["tokens_per_second"] > 0 and r["peak_rss_mb"] > 0
        assert r["minutes_per_1000_examples"] > 0
        assert 0 < r["trainable_parameters"] < r["total_parameters"]
        assert r["estimate_mb"] > 0 and math.isfinite(r["estimate_error_pct"])
        assert math.isfinite(r["dashboard_error_pct"])
        assert r["precision"] in ("bf16", "fp32")
    assert results["lora"]["linear4bit_modules"] == 0 and results["lora"]["plain_linear_modules"] > 0
    q = results["qlora"]
    assert q["linear4bit_modules"] > 0 and q["plain_linear_modules"] == 0 and q["quant_types"] == ["nf4"]
    assert q["base_memory_mb"] < results["lora"]["base_memory_mb"]
    md = (tmp_path / "model_scale_tiny.md").read_text()
    assert "| lora |" in md and "| qlora |" in md and "Linear4bit (nf4)" in md and "GFLOPS" in md
