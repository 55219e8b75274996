"""The quickstart on the real embedded model, with a smaller budget: fine-tuning must beat the base."""

import pytest
from rich.console import Console


@pytest.mark.slow
def test_quickstart_small_budget_improves_accuracy(tmp_path):
    from tunery.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(output=str(tmp_path / "qs"), n_epochs=1, max_train=96, max_test=30, shots=2)
    summary = run_quickstart(settings, Console(record=True, width=120))
    zero, few, after = (r["accuracy"] for r in summary["rows"])
    assert after > zero and after > few, summary["rows"]
    assert (tmp_path / "qs" / "quickstart.json").exists()
    assert (tmp_path / "qs" / "run" / "model" / "adapter_config.json").exists()
