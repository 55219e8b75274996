"""Explicit registries: each plug-in module registers itself once, by name."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from tunery.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to plug-ins. `loader` imports the builtin modules on first lookup, so importing a
    package that owns a registry (e.g. for its CLI) does not import torch and every plug-in."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        # The server looks plug-ins up from several threads at once (two keys evaluating): the
        # others wait until the first lookup has imported every builtin, instead of seeing a half
        # filled registry. Reentrant, since a plug-in may look another up while it is imported.
        self._lock = threading.RLock()
        self._ready = loader is None

    def _load(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._loader is not None:
                loader, self._loader = self._loader, None
                try:
                    loader()
                finally:
                    self._ready = True

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise RuntimeError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}.",
                hint=f"Available: {', '.join(sorted(self._items))}",
                param=self.kind,
            ) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._items)

    def items(self):
        self._load()
        return self._items.items()

    def names(self) -> list[str]:
        self._load()
        return list(self._items)
