"""Tuning methods, one module each, registered explicitly here."""

from tunery.methods.base import Method, count_parameters
from tunery.registry import Registry

METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def _load_builtin() -> None:
    # Each import registers one method. Order is the order `tunery methods` lists them in.
    from tunery.methods import full, lora  # noqa: F401


_load_builtin()

from tunery.methods.loading import continue_training, load_trained, read_info  # noqa: E402

__all__ = [
    "METHODS",
    "Method",
    "continue_training",
    "count_parameters",
    "load_trained",
    "read_info",
    "register",
]
