"""A learned loss-only allocator: a monotone curve E[v | loss] fitted online (docs/METHOD.md §5).

Neyman's n_i ∝ sqrt(v_i) needs v_i; from the pre-pass loss alone the best allocation
is n_i ∝ sqrt(E[v | loss_i]) (minimising E Σ v_i/n_i over functions of the loss). So the
curve is fitted to v itself, whose measured second moments are unbiased, not to sqrt(v).

After each step the (loss, measured v̂) pairs of the last ``window`` batches are pooled,
sorted by loss and cut into ``bins`` groups of equal size; the group means of v̂ are made
non-decreasing in loss (isotonic regression: harder datapoints never get fewer samples,
which also damps the noise of the top group) and the curve interpolates between the
groups' mean losses, constant beyond them. A batch is allocated by water-filling on
sqrt(curve(loss_i)), then rounded. The raw loss is the coordinate (not a per-batch
z-score), so the curve does not shift with each batch's spread; the window forgets
what training has moved past. Before any data the allocation is uniform.

Counts depend only on history and the pre-pass (docs/METHOD.md §3): unbiased.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.isotonic import isotonic
from fqa.allocators.rounding import round_to_budget, water_fill

_MIN_PER_BIN = 8  # fewer pairs per group and a group mean of χ²-like v̂ is mostly noise


@ALLOCATORS.register("loss_curve")
class LossCurveAllocator(Allocator):
    name = "loss_curve"

    def __init__(self, *, window: int = 32, bins: int = 16) -> None:
        for arg, value in (("window", window), ("bins", bins)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}={value!r} must be an integer >= 1")
        self.window = window
        self.bins = bins
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # (losses, v̂) per step
        self.curve: tuple[np.ndarray, np.ndarray] | None = None  # (group losses, iso v)

    def predict(self, losses: np.ndarray) -> np.ndarray:
        """E[v | loss] from the current curve (NaN for a non-finite loss or no curve)."""
        losses = np.asarray(losses, dtype=np.float64)
        if self.curve is None:
            return np.full(len(losses), np.nan)
        x, y = self.curve
        return np.interp(losses, x, y)  # NaN in, NaN out: water_fill gives it the mean

    def allocate(self, request: AllocationRequest) -> Allocation:
        rng = np.random.default_rng(request.seed)
        v = self.predict(request.losses)
        continuous = water_fill(np.sqrt(np.maximum(v, 0.0)), request.budget, request.n_min)
        counts = round_to_budget(continuous, request.budget, request.n_min, rng)
        return Allocation(counts, continuous, {"variance": v})

    def update(
        self, request: AllocationRequest, allocation: Allocation, measured: np.ndarray
    ) -> dict[str, float]:
        measured = np.asarray(measured, dtype=np.float64)
        if measured.shape != (len(request.ids),):
            raise ValueError(f"measured has shape {measured.shape}, expected ({len(request.ids)},)")
        losses = np.asarray(request.losses, dtype=np.float64)
        keep = np.isfinite(measured) & np.isfinite(losses)
        if (measured[keep] < 0).any():
            raise ValueError(f"measured variances must be >= 0, got min {measured[keep].min()}")
        if keep.any():
            self.history.append((losses[keep], measured[keep]))
            del self.history[: -self.window]
            self._fit()
        return {"curve_points": float(sum(len(h[0]) for h in self.history))}

    def _fit(self) -> None:
        if not self.history:
            self.curve = None
            return
        losses = np.concatenate([h[0] for h in self.history])
        values = np.concatenate([h[1] for h in self.history])
        order = np.argsort(losses, kind="stable")
        losses, values = losses[order], values[order]
        groups = max(1, min(self.bins, len(losses) // _MIN_PER_BIN))
        edges = np.linspace(0, len(losses), groups + 1).round().astype(np.int64)
        sizes = np.diff(edges).astype(np.float64)
        starts = edges[:-1]
        group_loss = np.add.reduceat(losses, starts) / sizes
        group_v = np.add.reduceat(values, starts) / sizes
        self.curve = (group_loss, isotonic(group_v, sizes))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[h[0].tolist(), h[1].tolist()] for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"history"}:
            raise ValueError(f"loss_curve allocator state needs key 'history', got {sorted(state)}")
        self.history = [
            (np.asarray(losses, dtype=np.float64), np.asarray(values, dtype=np.float64))
            for losses, values in state["history"]
        ][-self.window :]
        self._fit()
