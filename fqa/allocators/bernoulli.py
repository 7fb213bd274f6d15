"""The public FLOPS code's heuristic (docs/METHOD.md §6).

Each datapoint whose pre-pass loss is below the batch mean loses half of its uniform
share with probability p (never going below n_min); the freed samples are spread evenly
over the other datapoints.
"""

from __future__ import annotations

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.rounding import round_to_budget


@ALLOCATORS.register("bernoulli")
class BernoulliAllocator(Allocator):
    name = "bernoulli"

    def __init__(self, *, p: float = 0.5) -> None:
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p} must be in [0, 1] (probability of halving an easy datapoint)")
        self.p = p

    def allocate(self, request: AllocationRequest) -> Allocation:
        batch = len(request.ids)
        budget, n_min = request.budget, request.n_min
        rng = np.random.default_rng(request.seed)
        share = budget / batch
        losses = np.asarray(request.losses, dtype=np.float64)
        finite = np.isfinite(losses)
        mean = losses[finite].mean() if finite.any() else np.nan
        easy = finite & (losses < mean)  # NaN/inf losses count as hard
        cut = easy & (rng.random(batch) < self.p)
        keep = ~cut
        continuous = np.full(batch, share)
        reduced = max(float(n_min), share / 2)
        freed = (share - reduced) * cut.sum()
        if freed > 0 and keep.any():
            continuous[cut] = reduced
            continuous[keep] += freed / keep.sum()
        counts = round_to_budget(continuous, budget, n_min, rng)
        return Allocation(counts=counts, continuous=continuous, extras={"cut": cut})
