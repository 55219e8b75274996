"""What a user sees while it trains (issue 20 §6): no library noise in Tunery's output, on the Python
API as on the CLI (transformers' weight-loading and GGUF-conversion bars, the FutureWarning peft
triggers by reading `is_gradient_checkpointing`, bitsandbytes' hub-kernel notice), while real warnings
still print; and one training bar whose ETA, tokens/s and RSS survive a plain 80-column log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings

import pytest
from rich.console import Console

from tests.test_models import write_llama_gguf
from tunery.quiet import quiet_loading
from tunery.terminal import ProgressPrinter

NOISE = (
    "it/s]",  # any tqdm bar
    "Converting and de-quantizing",
    "Loading weights",
    "Writing model shards",
    "is_gradient_checkpointing",
    "kernels-community",
)

# The library path in a fresh process (the bitsandbytes notice is logged when peft is first
# imported): a GGUF resolved, converted and loaded, a LoRA applied, saved and loaded back, as the
# quickstart does through `tunery.workflows.quickstart`, then exported as merged safetensors, without
# the CLI's `quiet_libraries()`.
SCRIPT = """
import logging, sys, warnings
from tunery.export.write import export
from tunery.methods import METHODS
from tunery.models import load_model, resolve
from tunery.quiet import quiet_loading

gguf, adapter = sys.argv[1], sys.argv[2]
model = load_model(resolve(gguf))
lora = METHODS.get("lora")
lora.save(lora.apply(model, lora.options()), adapter)
lora.load(load_model(resolve(gguf)), adapter)
export(gguf, None, "hf", out=adapter + "-export")  # merged safetensors: "Writing model shards"
with quiet_loading():
    warnings.warn("3 rows are longer than max_length", UserWarning)
    logging.getLogger("tunery.data").warning("a real data problem")
print("--- user code ---", file=sys.stderr)
model.is_gradient_checkpointing  # the user's own deprecated call: its warning is theirs to see
"""


@pytest.mark.slow  # heavy for the developer loop: a fresh process loads and trains
def test_python_api_load_and_lora_print_no_library_noise(tmp_path, tiny_llama):
    gguf = write_llama_gguf(tiny_llama, tmp_path / "tiny-llama.gguf")
    env = {k: v for k, v in os.environ.items() if k not in ("TUNERY_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(TUNERY_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(gguf), str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tunery_part, user_part = proc.stderr.split("--- user code ---\n")
    assert not [n for n in NOISE if n in tunery_part + proc.stdout], tunery_part
    assert "UserWarning: 3 rows are longer than max_length" in tunery_part
    assert "a real data problem" in tunery_part
    # The filter is scoped to Tunery's loads: it neither leaked nor swallowed the user's own warning.
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in user_part


def test_quiet_scope_keeps_other_warnings_and_puts_filters_back():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with quiet_loading(), quiet_loading():  # nested, as a PEFT load inside a model load
            # the same text from another module than transformers' is not the known message
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("a real problem", UserWarning, stacklevel=1)
        assert warnings.filters == before
    assert [str(w.message) for w in seen] == ["`is_gradient_checkpointing` is deprecated", "a real problem"]


def test_training_bar_keeps_eta_tokens_per_second_and_rss_whole_in_an_80_column_log():
    out = io.StringIO()
    printer = ProgressPrinter(Console(file=out, width=80))  # not a terminal: a CI log, a pipe
    printer(
        {
            "type": "status",
            "level": "info",
            "message": "Fine-tuning job started",
            "data": {"total_steps": 1200},
        }
    )
    for step in (1, 600, 1200):
        data = {"step": step, "total_steps": 1200, "train_loss": 1.23456, "tokens_per_second": 12345.6}
        printer(
            {
                "type": "metrics",
                "level": "info",
                "message": "",
                "data": {**data, "rss_mb": 812.3, "valid_loss": 0.98765},
            }
        )
    printer.close()
    lines = out.getvalue().splitlines()  # one line, printed when the run ends, no cursor control
    assert len(lines) == 1 and "\x1b" not in lines[0], lines
    line = lines[0]
    assert re.search(r"1200/1200 0:00:00 loss 1\.2346  12346 tok/s  RSS 0\.81 GB  val 0\.9877$", line), line
