"""Tuning methods, one module each, registered explicitly here."""

from tunery.methods.base import Method, count_parameters
from tunery.registry import Registry

METHODS: Registry[Method] = Registry("method", loader=lambda: _load_builtin())


def register(method: Method) -> Method:
    # Every method gains a `moe` options block (router loss, router freezing, expert logging) that
    # acts only on MoE bases; see methods/moe_base.py for why this sits across methods.
    from tunery.methods.moe_base import with_moe

    return METHODS.register(method.name, with_moe(method))


def _load_builtin() -> None:
    # Each import registers one method. Order is the order `tunery methods` lists them in.
    from tunery.methods import (  # noqa: F401, I001 (listing order, not alphabetical)
        full,
        freeze,
        lora,
        qlora,
        adalora,
        ia3,
        prompt_tuning,
        prefix_tuning,
        p_tuning,
        adapter,
        unipelt,
        moe_lora,
    )


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
