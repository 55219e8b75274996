"""Keep library noise out of Tunery's terminal output, keep real warnings.

Tunery draws its own progress (one bar with ETA, tokens/s and RSS), so the libraries' bars for
weight loading, GGUF conversion and shard writing only interleave with it. Two known messages carry
no information for a Tunery user:

- transformers 5 deprecated `PreTrainedModel.is_gradient_checkpointing`, and peft (0.21) still reads
  it in `PeftModel.__init__`, so every LoRA wrap or adapter load raised a FutureWarning from
  `transformers.modeling_utils`. Tunery itself never reads the property; the filter matches that one
  message from that one module, so the same warning from a user's own call still shows.
- bitsandbytes, imported by peft, tries on an AVX512-BF16 CPU to fetch an optional 4-bit kernel from
  the hub ("kernels-community/quantization-bitsandbytes") and logs that it could not (Tunery runs
  offline by design; the built-in kernel is used); offline, the `kernels` package also logs that it
  skips that repository's publisher check. Filters on those two loggers drop exactly those records.

The silencing is scoped to the places that load, wrap or save models (`quiet_loading`), so it holds
for the Python API (`tunery.workflows.quickstart`) as much as for the CLI. Everything else (Tunery's
own warnings, UserWarnings, transformers' logged warnings, errors) still reaches the terminal.
`TUNERY_VERBOSE=1` turns all of this off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator

# (message regex, module regex): matched by text and origin, so a new warning is still shown.
_KNOWN_FUTURE_WARNINGS = ((r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),)
# logger -> how its record about bitsandbytes' optional hub kernel begins.
_KERNEL_PROBE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for "
    "'kernels-community/quantization-bitsandbytes'",
}


def verbose() -> bool:
    """`TUNERY_VERBOSE=1`: show the libraries' bars and messages as they come."""
    return bool(os.environ.get("TUNERY_VERBOSE"))


def _drop_kernel_probe(record: logging.LogRecord) -> bool:
    return verbose() or not str(record.msg).startswith(_KERNEL_PROBE.get(record.name, "\0"))


# Installed on import: bitsandbytes probes while it is imported (by peft), and every Tunery module that
# loads or wraps a model imports this one first. Only those records are dropped.
for _name in _KERNEL_PROBE:
    logging.getLogger(_name).addFilter(_drop_kernel_probe)


def quiet_libraries() -> None:
    """Call once at CLI start, before heavy imports read their environment."""
    if verbose():
        return
    # huggingface_hub's switch: transformers (GGUF loading, save_pretrained) and datasets read it at import.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for message, module in _KNOWN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)


_lock = threading.Lock()
_depth = 0
_undo: list[Callable[[], None]] = []


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Around a model load, PEFT wrap or save: no library progress bars, no known-noise warnings.

    Re-entrant and thread-safe: the first scope in turns the noise off, the last one out puts back
    exactly what it changed (the process's other warning filters are left alone, unlike
    `warnings.catch_warnings`, which restores the whole list and so races with other threads)."""
    global _depth
    if verbose():
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _undo[:] = [*_library_bars_off(), *_known_warnings_off()]
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for undo in reversed(_undo):
                    undo()
                _undo.clear()


def _known_warnings_off() -> list[Callable[[], None]]:
    added = []
    for message, module in _KNOWN_FUTURE_WARNINGS:
        before = list(warnings.filters)
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)
        if warnings.filters[0] not in before:  # one the CLI installed for good stays
            added.append(warnings.filters[0])

    def undo() -> None:
        for entry in added:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(entry)

    return [undo]


def _library_bars_off() -> list[Callable[[], None]]:
    """transformers' own switch for its bars ("Loading weights", "Writing model shards"), and its GGUF
    loop routed through that switch: it calls `tqdm.auto` directly, so neither
    `disable_progress_bar()` nor `HF_HUB_DISABLE_PROGRESS_BARS` reached it."""
    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    undo = []
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # a transformers without GGUF support: nothing to route
        gguf_loader = None
    if gguf_loader is not None and getattr(gguf_loader, "tqdm", None) is not hf_logging.tqdm:
        original = gguf_loader.tqdm
        gguf_loader.tqdm = hf_logging.tqdm
        undo.append(lambda: setattr(gguf_loader, "tqdm", original))
    # HF_HUB_DISABLE_PROGRESS_BARS=0 is a user asking for the bars; =1 has them off already.
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is None and hf_logging.is_progress_bar_enabled():
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        hub_was_off = are_progress_bars_disabled()
        hf_logging.disable_progress_bar()  # transformers' flag and huggingface_hub's

        def bars_on() -> None:
            hf_logging.enable_progress_bar()
            if hub_was_off:
                disable_progress_bars()

        undo.append(bars_on)
    return undo
