"""Query allocators, registered by name (timm style).

``create_allocator("neyman", prior_strength=2.0)`` builds one; ``list_allocators()``
names them all. Importing the modules below registers them.
"""

from __future__ import annotations

from typing import Any

from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.registry import Registry

ALLOCATORS = Registry[Allocator]("allocator")

# Imported for their registration side effect; after ALLOCATORS exists.
from fqa.allocators import bernoulli, gaussian, loss_curve, neyman, oracle, uniform  # noqa: E402, F401, I001


def create_allocator(name: str, **kwargs: Any) -> Allocator:
    return ALLOCATORS.create(name, **kwargs)


def list_allocators() -> list[str]:
    return ALLOCATORS.names()


__all__ = [
    "ALLOCATORS",
    "Allocation",
    "AllocationRequest",
    "Allocator",
    "create_allocator",
    "list_allocators",
]
