"""Explicit registries: each plug-in module registers itself once, by name."""

from __future__ import annotations

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

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

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
