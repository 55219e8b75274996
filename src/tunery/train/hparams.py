"""OpenAI's `auto` hyperparameters, resolved from the number of training examples."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunery.config import Hyperparameters

# The multiplier's reference point: a method's base learning rate is its rate at OpenAI's middle
# multiplier (0.1), so multipliers keep OpenAI's suggested 0.02-0.2 range and meaning.
MULTIPLIER_REFERENCE = 0.1


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


def resolve(hp: Hyperparameters, n_examples: int, base_learning_rate: float) -> Resolved:
    epochs = auto_epochs(n_examples) if hp.n_epochs == "auto" else int(hp.n_epochs)
    batch = auto_batch_size(n_examples) if hp.batch_size == "auto" else int(hp.batch_size)
    batch = max(1, min(batch, n_examples))
    mult = (
        auto_multiplier(batch)
        if hp.learning_rate_multiplier == "auto"
        else float(hp.learning_rate_multiplier)
    )
    lr = (
        hp.learning_rate if hp.learning_rate is not None else base_learning_rate * mult / MULTIPLIER_REFERENCE
    )
    return Resolved(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=mult, learning_rate=lr)
