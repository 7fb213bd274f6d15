"""Name -> factory registries (timm style: ``create_*(name, **kw)`` and ``list_*()``).

Names map directly onto config values and Tune search spaces, and tests are
parametrised over every registered item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def check(self, name: str) -> None:
        if name not in self._factories:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )

    def create(self, name: str, **kwargs) -> T:
        self.check(name)
        return self._factories[name](**kwargs)
