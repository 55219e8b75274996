"""The quickstart on the real embedded model: the fine-tuned model must reach the documented floor.

The README measures 100% (fp32) and 96.7% (bf16) on the 90 test reviews of `datasets/sentiment` at the
quickstart's settings (LoRA r16, 2 epochs, 76 steps). This test runs exactly those settings and holds
the result to 90%, so a regression in quality (data, template, loss, LoRA, generation) fails here rather
than only slipping below the base model. (One epoch on 160 examples measured exactly 90%: too close to
the floor to be a stable cheaper stand-in.)"""

import json

import pytest
from rich.console import Console

FLOOR = 0.9


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a real 135M model: 76 steps and three evaluations on two CPU cores
def test_quickstart_reaches_the_documented_floor(tmp_path):
    from tunery.workflows.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(output=str(tmp_path / "qs"))  # the quickstart's own settings
    summary = run_quickstart(settings, Console(record=True, width=120))
    zero, few, after = summary["rows"]
    assert summary["n_test"] == 90  # the whole test set, not a sample
    assert after["label"] == "LoRA fine-tuned" and after["accuracy"] >= FLOOR, summary["rows"]
    invalid = after["invalid"]["count"] if isinstance(after["invalid"], dict) else after["invalid"]
    assert invalid == 0  # every reply is one of the labels
    assert after["accuracy"] > max(zero["accuracy"], few["accuracy"])
    saved = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert saved["rows"][-1]["accuracy"] == after["accuracy"]
    assert (tmp_path / "qs" / "run" / "model" / "adapter_config.json").exists()
