"""`unwrap(model)`: the transformers model under a peft wrapper.

peft injects its adapter layers into the base model in place, so the unwrapped model still runs
them; callers unwrap to reach what only the base has (its decoder, config, device map, forward
signature).
"""

from __future__ import annotations

from typing import Any


def unwrap(model: Any) -> Any:
    """The base model of a peft `PeftModel`; any other model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
