"""Shared helpers: water-filling (docs/METHOD.md §4) and rounding to an exact integer budget."""

from __future__ import annotations

import numpy as np

# Remainders closer than this are ties, broken by the seeded permutation rather than by
# floating-point noise (so e.g. 10/3 on every datapoint spreads the remainder at random).
_TIE_DECIMALS = 9


def water_fill(weights: np.ndarray, budget: int, n_min: int) -> np.ndarray:
    """n_i = max(n_min, λ·w_i) with Σ n_i = budget: the floored Neyman allocation.

    NaN weights take the mean of the finite ones; all-zero or all-NaN weights give the
    uniform allocation. Returns float64 [B], sum == budget (up to rounding error).
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    batch = len(w)
    if batch == 0:
        raise ValueError("water_fill needs at least one weight")
    if np.isinf(w).any() or (w < 0).any():
        raise ValueError(
            f"weights must be finite and >= 0, got min {np.nanmin(w)}, max {np.nanmax(w)}"
        )
    if budget < batch * n_min:
        raise ValueError(f"budget {budget} is below batch_size*n_min = {batch}*{n_min}")
    finite = np.isfinite(w)
    if not finite.any():
        return np.full(batch, budget / batch)
    w[~finite] = w[finite].mean()
    if w.sum() <= 0:
        return np.full(batch, budget / batch)
    if budget == batch * n_min:
        return np.full(batch, float(n_min))

    # The datapoints above the floor are the k largest weights; k is the largest k whose
    # level λ_k = (budget - (B-k)·n_min) / (sum of the k largest) lifts the k-th above n_min.
    order = np.argsort(-w, kind="stable")
    sorted_w = w[order]
    k = np.arange(1, batch + 1)
    level = (budget - (batch - k) * n_min) / np.cumsum(sorted_w)
    ok = level * sorted_w >= n_min * (1 - 1e-12)
    k_star = int(np.flatnonzero(ok).max())  # k=1 always qualifies since budget >= B·n_min
    lam = level[k_star]
    out = np.maximum(float(n_min), lam * w)
    return out


def round_to_budget(
    continuous: np.ndarray, budget: int, n_min: int, rng: np.random.Generator
) -> np.ndarray:
    """Largest-remainder rounding: int64 counts >= n_min with sum == budget exactly.

    ``continuous`` must be >= n_min and sum to ``budget``. Equal remainders are ordered by
    a permutation drawn from ``rng``, so a seeded rng gives reproducible counts.
    """
    c = np.asarray(continuous, dtype=np.float64)
    batch = len(c)
    if not np.isfinite(c).all():
        raise ValueError("continuous allocation has non-finite entries")
    tol = 1e-6 * max(1.0, float(budget))
    if abs(c.sum() - budget) > tol or (c < n_min - tol).any():
        raise ValueError(
            f"continuous allocation must be >= n_min={n_min} and sum to budget={budget}; "
            f"got min {c.min():.6g}, sum {c.sum():.6g}"
        )
    base = np.maximum(np.floor(c + 1e-9), n_min).astype(np.int64)
    deficit = budget - int(base.sum())
    # Float error can leave base one unit over/under per entry; both cases are repaired
    # by ranking remainders (most deserving first).
    remainder = np.round(c - base, _TIE_DECIMALS)
    tiebreak = rng.permutation(batch)
    if deficit >= 0:
        order = np.lexsort((tiebreak, -remainder))  # primary key: largest remainder
        steps = np.zeros(batch, dtype=np.int64)
        full, part = divmod(deficit, batch)
        steps += full
        steps[order[:part]] += 1
        return base + steps
    # Over budget (only through float error): take back from the smallest remainders
    # among entries that stay >= n_min.
    counts = base.copy()
    order = np.lexsort((tiebreak, remainder))
    for i in order:
        if deficit == 0:
            break
        if counts[i] > n_min:
            counts[i] -= 1
            deficit += 1
    if deficit != 0:
        raise ValueError(f"cannot round to budget {budget} with n_min {n_min}")
    return counts
