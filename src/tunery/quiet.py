"""Keep library noise out of Tunery's terminal output, keep real warnings.

Tunery draws its own progress (one bar with ETA, tokens/s and RSS), so the libraries' bars for
GGUF conversion, shard writing and dataset maps only interleave with it. Two known messages carry
no information for a Tunery user: transformers' FutureWarning about `is_gradient_checkpointing`
(peft reads that property on every wrap) and bitsandbytes' notice that it could not fetch an
optional CPU kernel from the hub (this machine is offline by design; the built-in kernel is used).
Everything else (UserWarnings, transformers' own warnings, errors) still reaches the terminal.
`TUNERY_VERBOSE=1` turns all of this off.
"""

from __future__ import annotations

import logging
import os
import warnings

# Messages matched exactly by their text, so a new warning from the same library is still shown.
_SILENCED_WARNINGS = (r".*is_gradient_checkpointing.*",)
_SILENCED_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


def quiet_libraries() -> None:
    """Call once at CLI start, before heavy imports read their environment."""
    if os.environ.get("TUNERY_VERBOSE"):
        return
    # huggingface_hub's switch: transformers (GGUF loading, save_pretrained) and datasets read it at import.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for pattern in _SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    for name, level in _SILENCED_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
