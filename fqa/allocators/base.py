"""The allocator contract: split a budget of samples over the datapoints of a batch.

A *sample* is the estimator's unit of work (a central-difference pair for `spsa`,
an antithetic pair for `lr`, one query otherwise); the trainer converts queries to
samples before asking. Allocators are small stateful objects whose whole state is
JSON-able (``state_dict``), so it can be checkpointed and moved to a Ray actor.

Unbiasedness (docs/METHOD.md §3): counts are decided only from history (the running
statistics) and the unperturbed pre-pass losses, never from this step's perturbed
results. ``update`` runs after the step and may only change future allocations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AllocationRequest:
    ids: np.ndarray  # int64 [B]: global datapoint indices (stats are keyed by these)
    losses: np.ndarray  # float64 [B]: unperturbed pre-pass loss of each datapoint
    budget: int  # N: samples to split over the batch; sum(counts) == N exactly
    n_min: int  # floor: every datapoint gets at least this many samples
    seed: int  # step seed: the same request and seed give the same counts
    # Per-datapoint variance estimates v̂_i from earlier steps (any common scale; NaN where
    # the datapoint was never observed) and how many samples each estimate rests on.
    variance: np.ndarray | None = None
    observations: np.ndarray | None = None
    # True v_i, known only in benchmarks and tests (used by the `oracle` allocator).
    oracle_variance: np.ndarray | None = None

    def __post_init__(self) -> None:
        batch = len(self.ids)
        if batch == 0:
            raise ValueError("allocation request has an empty batch")
        if len(self.losses) != batch:
            raise ValueError(f"{len(self.losses)} losses for {batch} datapoints")
        if self.n_min < 1:
            raise ValueError(f"n_min={self.n_min} must be >= 1 (every datapoint needs a sample)")
        if self.budget < batch * self.n_min:
            raise ValueError(
                f"budget {self.budget} is below batch_size*n_min = {batch}*{self.n_min}; "
                "raise the budget or lower n_min"
            )


@dataclass(frozen=True)
class Allocation:
    counts: np.ndarray  # int64 [B]: samples per datapoint, >= n_min, sum == budget
    continuous: np.ndarray  # float64 [B]: the allocation before rounding (sum == budget)
    extras: dict[str, Any] = field(default_factory=dict)  # allocator-specific, for update()


class Allocator(ABC):
    """Base class; subclasses register themselves in ``fqa.allocators.ALLOCATORS``."""

    name: str = "base"
    needs_oracle: bool = False  # True only for the benchmark-only oracle

    @abstractmethod
    def allocate(self, request: AllocationRequest) -> Allocation: ...

    def update(
        self, request: AllocationRequest, allocation: Allocation, measured: np.ndarray
    ) -> dict[str, float]:
        """Learn from this step's measured per-datapoint variances (same order as request.ids).

        Returns scalar metrics for logging. Stateless allocators do nothing.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"allocator {self.name!r} has no state, got keys {sorted(state)}")
