"""The `auto` hyperparameters, resolved from the number of training examples and the device.

OpenAI's rules are the base: 3 epochs, batch 0.2% of the examples, multiplier 0.05/0.1/0.2 by batch.
`auto_rule: device` (the default) changes one thing on a CPU: from CPU_BATCH_FROM examples the batch is
at least CPU_MIN_BATCH, and the multiplier OpenAI gives its own batch is scaled linearly with the
raise, so each example moves the weights as much as before. A CPU runs batch 1 at a fraction of batch
8's tokens per second, so batch 1 spent the minutes: on smollm2-135m it reached 97% on sentiment in
7.0 minutes and 95% on routing in 8.3, where batch 8 with the scaled rate took 1.3 and 3.7, against
the Trainer recipe's 4.0 and never (docs/performance.md, "Time to a good model").
`auto_rule: openai` keeps OpenAI's rules on every device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunery.config import Hyperparameters

# The multiplier's reference point: a method's base learning rate is its rate at OpenAI's middle
# multiplier (0.1), so multipliers keep OpenAI's suggested 0.02-0.2 range and meaning.
MULTIPLIER_REFERENCE = 0.1
# `auto_rule: device` on a CPU: the smallest auto batch, and the set size it starts at (below it a
# batch of 8 would leave too few steps an epoch to scale the learning rate into safely).
CPU_MIN_BATCH = 8
CPU_BATCH_FROM = 100


@dataclass
class Resolved:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


def auto_epochs(n_examples: int) -> int:
    """OpenAI's estimate: 3, raised for tiny sets and lowered for huge ones."""
    if n_examples * 3 < 100:
        return min(25, 100 // max(1, n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def auto_batch_size(n_examples: int) -> int:
    """0.2% of the training examples, clamped to [1, 256]."""
    return max(1, min(256, round(0.002 * n_examples)))


def auto_multiplier(batch_size: int) -> float:
    """Legacy OpenAI rule: 0.05 / 0.1 / 0.2, larger batches take larger steps."""
    if batch_size < 8:
        return 0.05 if batch_size <= 2 else 0.1
    return 0.1 if batch_size < 64 else 0.2


def device_batch_size(n_examples: int, rule: str, device_type: str) -> int:
    """`auto`'s batch: OpenAI's, raised to CPU_MIN_BATCH on a CPU under `auto_rule: device`."""
    batch = auto_batch_size(n_examples)
    if rule == "device" and device_type == "cpu" and n_examples >= CPU_BATCH_FROM:
        batch = max(batch, CPU_MIN_BATCH)
    return batch


def device_multiplier(n_examples: int, batch_size: int, rule: str, device_type: str) -> float:
    """`auto`'s multiplier at `batch_size`: OpenAI's for that batch, except where `auto_rule: device`
    raised the batch itself, which scales OpenAI's multiplier of its own batch linearly."""
    openai_batch = auto_batch_size(n_examples)
    if batch_size == device_batch_size(n_examples, rule, device_type) != openai_batch:
        return auto_multiplier(openai_batch) * batch_size / openai_batch
    return auto_multiplier(batch_size)


def resolve(
    hp: Hyperparameters, n_examples: int, base_learning_rate: float, device_type: str = "cpu"
) -> Resolved:
    """Every `auto` of `hp` resolved for `n_examples` examples trained on a `device_type` device."""
    epochs = auto_epochs(n_examples) if hp.n_epochs == "auto" else int(hp.n_epochs)
    auto_batch = hp.batch_size == "auto"
    batch = device_batch_size(n_examples, hp.auto_rule, device_type) if auto_batch else int(hp.batch_size)
    batch = max(1, min(batch, n_examples))
    if hp.learning_rate_multiplier != "auto":
        mult = float(hp.learning_rate_multiplier)
    elif auto_batch:
        mult = device_multiplier(n_examples, batch, hp.auto_rule, device_type)
    else:
        mult = auto_multiplier(batch)
    lr = (
        hp.learning_rate if hp.learning_rate is not None else base_learning_rate * mult / MULTIPLIER_REFERENCE
    )
    return Resolved(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=mult, learning_rate=lr)
