"""This machine's CPU as `/proc/cpuinfo` describes it: what a verdict measured on one CPU (the bf16
probe in models/cpu_bf16.py, the llama.cpp probe in serve/engines/llamacpp_probe.py) is keyed by."""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo() -> str:
    """`/proc/cpuinfo`, or "" where it cannot be read (not Linux). Read each time, not cached: its
    callers cache their own answers, and tests fake the file."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_identity() -> tuple[str, str]:
    """(model, flags) of the first processor: its model name (the platform's processor or machine
    string where `/proc/cpuinfo` has none) and its flags line ("" where there is none)."""
    fields: dict[str, str] = {}
    for line in cpuinfo().splitlines():
        label, _, value = line.partition(":")
        fields.setdefault(label.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, fields.get("flags", "")
