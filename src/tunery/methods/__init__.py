"""Tuning methods, one module each, registered explicitly here."""

from tunery.methods.base import Method, count_parameters, has_token_averaged_loss
from tunery.methods.loading import continue_training, load_trained, read_info
from tunery.methods.moe_base import with_routers
from tunery.methods.registry import METHODS


def register(method: Method) -> Method:
    """Register `method`, its steps followed by the router layer of MoE bases (router loss, router
    freezing, expert logging; a no-op on dense bases), which its options' `moe` block configures:
    see methods/moe_base.py for why this sits across methods."""
    if "moe" not in method.options.model_fields:
        raise TypeError(f"{method.options.__name__} must declare `moe: MoeBlock` (methods/base.py).")
    return METHODS.register(method.name, with_routers(method))


__all__ = [
    "METHODS",
    "Method",
    "continue_training",
    "count_parameters",
    "has_token_averaged_loss",
    "load_trained",
    "read_info",
    "register",
]
