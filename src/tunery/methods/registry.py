"""The registry of tuning methods. Its loader imports the builtin methods (each registers itself through
`tunery.methods.register`) on first lookup. Apart from the package, so that `loading.py` can look a
saved method up without importing the package that imports it."""

from tunery.methods.base import Method
from tunery.registry import Registry

METHODS: Registry[Method] = Registry("method", loader=lambda: _load_builtin())


def _load_builtin() -> None:
    # Each import registers one method (it imports `register` from tunery.methods: at the top, an import
    # cycle; tunery/optional.py EXCEPTIONS). Order is the order `tunery methods` lists them in.
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
