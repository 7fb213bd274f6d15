"""Oracle allocation: Neyman water-filling on the true variances (benchmarks and tests only).

It is the ceiling every practical allocator is measured against (docs/METHOD.md §4).
"""

from __future__ import annotations

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.rounding import round_to_budget, water_fill


@ALLOCATORS.register("oracle")
class OracleAllocator(Allocator):
    name = "oracle"
    needs_oracle = True

    def allocate(self, request: AllocationRequest) -> Allocation:
        if request.oracle_variance is None:
            raise ValueError(
                "oracle allocator is for benchmarks/tests; it needs true variances "
                "(AllocationRequest.oracle_variance)"
            )
        v = np.asarray(request.oracle_variance, dtype=np.float64)
        if v.shape != (len(request.ids),):
            raise ValueError(f"oracle_variance has shape {v.shape}, expected ({len(request.ids)},)")
        if (v < 0).any():
            raise ValueError(f"oracle_variance must be >= 0, got min {np.nanmin(v)}")
        continuous = water_fill(np.sqrt(v), request.budget, request.n_min)
        rng = np.random.default_rng(request.seed)
        counts = round_to_budget(continuous, request.budget, request.n_min, rng)
        return Allocation(counts=counts, continuous=continuous)
