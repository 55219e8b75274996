"""The run's performance levers: switches that change how a step is computed, never what it computes.

Each is exact (the tests compare every setting against the default); they exist so the benchmark
(bench/train_throughput.py) can undo one at a time and measure what it buys. A run carries them in
its setup (`run(config, levers=...)`), and they reach the code that uses them as arguments: the
attention name set on the model, the fused-layer switch, a flag on each collated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttentionMode = Literal["auto", "segments", "varlen", "mask"]


@dataclass(frozen=True)
class Levers:
    # How packed rows are isolated (modeling/attention.py): "auto" = "varlen" on a GPU for
    # half-precision inputs, else "segments"; "mask" is one SDPA call with a dense 4D block mask.
    attention: AttentionMode = "auto"
    # False applies the LM head at every position (prompt tokens too), as stock trainers do.
    supervised_head_only: bool = True
    # False leaves peft's own LoRA forward in place of the fused one (train/lora_kernel.py).
    fused_lora: bool = True
    # False computes a prefix common to a packed micro-batch's rows (a system prompt) once per row
    # instead of once (modeling/prefix.py).
    shared_prefix: bool = True


DEFAULT = Levers()
