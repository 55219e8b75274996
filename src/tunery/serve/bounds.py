"""Bounds on the dashboard's heavy calls, `/v1/tunery/evaluate` and `/v1/tunery/export`.

Each call loads whole models into the server's memory (evaluate up to four at once) and runs for
minutes, outside the training queue. Without bounds one key could exhaust the server's memory or keep
every CPU busy. So:

- one heavy call at a time per key, evaluate and export together: a second one gets a 429;
- the models one call loads hold at most `Settings.max_eval_export_params` parameters together;
- an evaluation reads at most `MAX_EVAL_EXAMPLES` examples and writes at most `MAX_EVAL_NEW_TOKENS`
  tokens per reply;
- an export works in `files/.tmp/export-*`, removed when it fails (and, should the process die, by the
  files sweep: see `serve/file_sweep.py`).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Request

from tunery.models.load import count_safetensors_params
from tunery.serve.common import ApiError, Principal
from tunery.workflows.recommend import model_facts

MAX_EVAL_EXAMPLES = 2000
MAX_EVAL_NEW_TOKENS = 2048


class KeySlots:
    """Which keys have a heavy call running; thread-safe, so a slot may be released from a worker."""

    def __init__(self) -> None:
        self._busy: dict[str, str] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key_id: str, what: str) -> Iterator[None]:
        with self._lock:
            running = self._busy.get(key_id)
            if running is not None:
                raise ApiError(
                    429,
                    f"This key already has {running} running; the server runs one evaluate or export "
                    "per key at a time. Try again when it has finished.",
                    code="concurrent_requests_exceeded",
                    type="rate_limit_error",
                )
            self._busy[key_id] = what
        try:
            yield
        finally:
            with self._lock:
                self._busy.pop(key_id, None)

    def busy(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._busy


def heavy_slot(request: Request, who: Principal, what: str):
    """The calling key's one heavy slot (a context manager); raises a 429 when it is taken."""
    state = request.app.state
    slots = getattr(state, "heavy_slots", None)
    if slots is None:  # made on first use, in the event loop: no other task runs in between
        slots = state.heavy_slots = KeySlots()
    return slots.hold(who.id, what)


def model_params(base: str, adapter_dir: Path | None = None) -> int:
    """Parameters loading `base` (plus a saved model dir) brings into memory, read from the config and
    the safetensors headers; no weights are loaded."""
    total = model_facts(base).n_params
    if adapter_dir is not None:
        total += count_safetensors_params(adapter_dir) or 0
    return total


def check_model_size(models: list[tuple[str, Path | None]], limit: int, param: str = "model") -> None:
    """Refuse a call whose models hold more than `limit` parameters together (0: no limit)."""
    if limit <= 0:
        return
    total = sum(model_params(base, adapter) for base, adapter in models)
    if total > limit:
        what = "These models hold" if len(models) > 1 else "This model holds"
        raise ApiError(
            400,
            f"{what} {_billions(total)} parameters; the server evaluates and exports at most "
            f"{_billions(limit)} per call. Compare fewer or smaller models, or run `tunery eval` / "
            "`tunery export` on a machine of your own.",
            code="model_too_large",
            param=param,
        )


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e7 else f"{n:,}"


def check_eval_size(n_examples: int, max_new_tokens: Any) -> None:
    if n_examples > MAX_EVAL_EXAMPLES:
        raise ApiError(
            400,
            f"The evaluation file has {n_examples} examples; the server evaluates at most "
            f"{MAX_EVAL_EXAMPLES}. Use a sample of it, or `tunery eval` for the whole file.",
            code="file_too_large",
            param="file",
        )
    if max_new_tokens is not None and max_new_tokens > MAX_EVAL_NEW_TOKENS:
        raise ApiError(
            400,
            f"max_new_tokens must be at most {MAX_EVAL_NEW_TOKENS}.",
            param="max_new_tokens",
        )


@contextmanager
def export_workdir(data_dir: Path) -> Iterator[Path]:
    """A fresh `files/.tmp/export-*` dir, removed if anything inside the block fails; on success the
    caller owns it (it is removed after the download)."""
    tmp = data_dir / "files" / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=tmp))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
