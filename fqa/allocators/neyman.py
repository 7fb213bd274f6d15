"""Neyman allocation from per-datapoint history (docs/METHOD.md §4 and §6).

v̂_i comes from the running statistics (earlier steps and epochs) and is shrunk toward a
prediction for datapoints with few or no observations:

    v_i = (obs_i·v̂_i + κ·pred_i) / (obs_i + κ),   κ = prior_strength

pred_i = (α + β·loss_i)², a least-squares fit of sqrt(v̂) against the pre-pass loss over
the batch's observed datapoints (or the mean of sqrt(v̂) when a fit is not possible).
Then n_i = max(n_min, λ·sqrt(v_i)), rounded. Only history and the pre-pass decide the
counts, so the estimator stays unbiased (§3).
"""

from __future__ import annotations

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.rounding import round_to_budget, water_fill

_MIN_FIT_POINTS = 3  # a line through fewer points is noise


def _predict_sqrt_variance(
    sqrt_v: np.ndarray, losses: np.ndarray, observed: np.ndarray
) -> np.ndarray:
    """Predicted sqrt(v) for every datapoint from the observed ones; >= 0."""
    fallback = float(sqrt_v[observed].mean())
    pred = np.full(len(losses), fallback)
    fit = observed & np.isfinite(losses)
    if fit.sum() >= _MIN_FIT_POINTS:
        x, y = losses[fit], sqrt_v[fit]
        spread = x.std()
        if spread > 1e-12 * max(1.0, float(np.abs(x).max())):
            slope = float(((x - x.mean()) * (y - y.mean())).mean() / spread**2)
            intercept = float(y.mean() - slope * x.mean())
            has_loss = np.isfinite(losses)
            pred[has_loss] = intercept + slope * losses[has_loss]
    return np.maximum(pred, 0.0)


@ALLOCATORS.register("neyman")
class NeymanAllocator(Allocator):
    name = "neyman"

    def __init__(self, *, prior_strength: float = 2.0) -> None:
        prior_strength = float(prior_strength)
        if not prior_strength >= 0.0 or not np.isfinite(prior_strength):
            raise ValueError(
                f"prior_strength={prior_strength} must be finite and >= 0 "
                "(pseudo-observations given to the loss-based prediction)"
            )
        self.prior_strength = prior_strength

    def allocate(self, request: AllocationRequest) -> Allocation:
        batch = len(request.ids)
        budget, n_min = request.budget, request.n_min
        rng = np.random.default_rng(request.seed)
        if request.variance is None:
            v_hat = np.full(batch, np.nan)
        else:
            v_hat = np.asarray(request.variance, dtype=np.float64)
        if v_hat.shape != (batch,):
            raise ValueError(f"variance has shape {v_hat.shape}, expected ({batch},)")
        # Missing observation counts mean the estimates are trusted as they are.
        if request.observations is None:
            obs = np.where(np.isfinite(v_hat), np.inf, 0.0)
        else:
            obs = np.asarray(request.observations, dtype=np.float64)
            if obs.shape != (batch,):
                raise ValueError(f"observations has shape {obs.shape}, expected ({batch},)")
        observed = np.isfinite(v_hat) & (obs > 0)
        if not observed.any():
            continuous = np.full(batch, budget / batch)
            counts = round_to_budget(continuous, budget, n_min, rng)
            return Allocation(counts, continuous, {"variance": np.full(batch, np.nan)})

        v_hat = np.where(observed, np.maximum(v_hat, 0.0), 0.0)  # second moments are >= 0
        obs = np.where(observed, obs, 0.0)
        pred = (
            _predict_sqrt_variance(np.sqrt(v_hat), np.asarray(request.losses, float), observed) ** 2
        )
        kappa = self.prior_strength
        trusted = np.isinf(obs)
        with np.errstate(invalid="ignore", divide="ignore"):
            shrunk = (obs * v_hat + kappa * pred) / (obs + kappa)
        v = np.where(trusted, v_hat, shrunk)
        v = np.where(obs + kappa > 0, v, pred)  # kappa = 0 and unobserved: prediction only
        continuous = water_fill(np.sqrt(v), budget, n_min)
        counts = round_to_budget(continuous, budget, n_min, rng)
        return Allocation(counts, continuous, {"variance": v})
