"""Uniform allocation: N/B samples each, the remainder spread over a seeded random subset."""

from __future__ import annotations

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.rounding import round_to_budget


@ALLOCATORS.register("uniform")
class UniformAllocator(Allocator):
    name = "uniform"

    def allocate(self, request: AllocationRequest) -> Allocation:
        batch = len(request.ids)
        continuous = np.full(batch, request.budget / batch)
        rng = np.random.default_rng(request.seed)
        counts = round_to_budget(continuous, request.budget, request.n_min, rng)
        return Allocation(counts=counts, continuous=continuous)
