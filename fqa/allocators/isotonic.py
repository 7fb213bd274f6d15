"""Weighted isotonic (non-decreasing) regression by pooling adjacent violators.

Used to fit E[v | loss] as a monotone curve (``loss_curve``) and, with the true variances,
for the benchmark's monotone-in-loss ceiling. For a fixed order, n_i ∝ sqrt(iso(v)_i)
minimises Σ v_i/n_i among allocations non-decreasing in that order: on a pooled block the
best common n is set by the block's mean v, which is what the pooling returns.
"""

from __future__ import annotations

import numpy as np


def isotonic(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in weighted least squares."""
    y = np.asarray(values, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    if y.shape != w.shape or y.ndim != 1:
        raise ValueError(f"values {y.shape} and weights {w.shape} must be equal 1-D shapes")
    if (w <= 0).any() or not np.isfinite(w).all() or not np.isfinite(y).all():
        raise ValueError("isotonic regression needs finite values and positive finite weights")
    # blocks as a stack of (weighted mean, weight, length); a new point merges backwards
    # while it breaks the order. O(n) amortised; n is small (bins or a batch).
    means, sums, lengths = [], [], []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        mean, total, length = value, weight, 1
        while means and means[-1] > mean:
            total_prev = sums.pop()
            mean = (means.pop() * total_prev + mean * total) / (total_prev + total)
            total += total_prev
            length += lengths.pop()
        means.append(mean)
        sums.append(total)
        lengths.append(length)
    return np.repeat(means, lengths)
