"""How many parameters a run trains, before anything is loaded: the one count behind `tunery
recommend` (`workflows/recommend.py`) and the dashboard's estimate (`serve/ui_estimate.py`).

Each method answers for itself (`Method.trainable_parameters`, from the model's shape and the
method's options), so a new method, or a change to what one trains, reaches both estimates at once.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tunery.errors import ConfigError
from tunery.models.shape import ModelShape, model_shape, shape_from_config

__all__ = ["ModelShape", "model_shape", "shape_from_config", "trainable_parameters"]


def trainable_parameters(
    method: str, shape: ModelShape, options: dict[str, Any] | None = None
) -> tuple[int, str]:
    """(trainable parameters, what trains) of `method` on a model of `shape`.

    `options` are the method's options as a request gives them; names the method does not have, and
    unset (None) values, are left out, so an estimate never fails on them. A method that gives no
    count, or a name that is no method, is estimated as a small adapter."""
    from tunery.methods import METHODS  # the registry imports torch: only when an estimate is asked

    if method in METHODS:
        m = METHODS.get(method)
        if m.trainable_parameters is not None:
            known = {
                k: v for k, v in (options or {}).items() if k in m.options.model_fields and v is not None
            }
            try:
                opts = m.options.model_validate(known)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(x) for x in first["loc"])
                raise ConfigError(
                    f"Invalid {method} option {field}: {first['msg']}.", param="options"
                ) from None
            return m.trainable_parameters(shape, opts)
    return max(1, shape.n_params // 100), "about 1% of the weights (small adapter)"
