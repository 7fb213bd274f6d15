"""The learned FLOPS allocator (docs/METHOD.md §5): four parameters, trained by Adam.

Losses of the batch are standardised to z; a score vector s ~ N(μ, K) with

    μ_i = a·z_i + c,   K_ij = v·exp(−(z_i − z_j)² / (2ℓ²)) + jitter·δ_ij

is drawn as s = μ + Lξ (L = chol K, ξ ~ N(0, I) from the request's seed), and

    ñ_i = n_min + softplus(s_i) / Σ_j softplus(s_j) · (N − B·n_min)

is rounded to the budget. After the step, the measured v̂_i give the proxy objective
J(φ) = Σ v̂_i / ñ_i, divided by its value under the uniform allocation (so the scale
of v̂ does not matter and J = 1 means "as good as uniform"). φ = (a, c, log ℓ, log v)
takes an Adam step along the pathwise gradient with the same ξ. Since ξ does not
depend on φ, the gradient stays unbiased even if φ moved between allocate and update.

Everything is float64 numpy with the gradient written out (checked against finite
differences in the tests): a B×B problem is too small for autograd, and torch's
threaded LAPACK is orders of magnitude slower on it when the CPU is busy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fqa.allocators import ALLOCATORS
from fqa.allocators.base import Allocation, AllocationRequest, Allocator
from fqa.allocators.rounding import round_to_budget

PARAM_NAMES = ("a", "c", "log_ell", "log_v")
# Box for φ: keeps softplus away from underflow and K well conditioned.
_LOWER = np.array([-50.0, -50.0, math.log(1e-3), math.log(1e-8)])
_UPPER = np.array([50.0, 50.0, math.log(1e3), math.log(1e2)])
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # Adam defaults


def standardise(losses: np.ndarray) -> np.ndarray:
    """z-scores of the batch's losses; 0 where the loss is not finite or all are equal."""
    losses = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses)
    z = np.zeros(len(losses))
    if finite.sum() >= 2:
        x = losses[finite]
        std = x.std()
        if std > 1e-12 * max(1.0, float(np.abs(x).max())):
            z[finite] = (x - x.mean()) / std
    return z


@dataclass(frozen=True)
class _Forward:
    """ñ(φ; z, ξ) and the intermediates its gradient needs."""

    continuous: np.ndarray  # ñ, float64 [B]
    s: np.ndarray  # scores μ + Lξ
    soft: np.ndarray  # softplus(s)
    chol: np.ndarray  # L = chol(K)
    rbf: np.ndarray  # v·exp(−(z_i − z_j)²/(2ℓ²)), K without jitter
    sq_dist: np.ndarray  # (z_i − z_j)²


def _forward(
    phi: np.ndarray, z: np.ndarray, xi: np.ndarray, budget: int, n_min: int, jitter: float
) -> _Forward:
    a, c, log_ell, log_v = phi
    batch = len(z)
    sq_dist = (z[:, None] - z[None, :]) ** 2
    rbf = math.exp(log_v) * np.exp(-sq_dist / (2.0 * math.exp(2.0 * log_ell)))
    for attempt in range(6):  # K is PD; more jitter only if rounding breaks Cholesky
        try:
            chol = np.linalg.cholesky(rbf + jitter * 10.0**attempt * np.eye(batch))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise RuntimeError("gaussian allocator: covariance is not positive definite")
    s = a * z + c + chol @ xi
    soft = np.logaddexp(0.0, s)  # softplus, overflow-safe
    share = soft / soft.sum()
    continuous = n_min + share * (budget - batch * n_min)
    return _Forward(continuous, s, soft, chol, rbf, sq_dist)


def _gradient(
    fwd: _Forward, phi: np.ndarray, z: np.ndarray, xi: np.ndarray, d_n: np.ndarray, extra: int
) -> np.ndarray:
    """dJ/dφ by the chain rule, given d_n = dJ/dñ (pathwise: ξ held fixed)."""
    total = fwd.soft.sum()
    d_soft = extra / total * (d_n - (d_n * fwd.soft).sum() / total)  # through the share
    d_s = d_soft * np.exp(-np.logaddexp(0.0, -fwd.s))  # softplus' = sigmoid, stable
    # Kernel parameters act through L: dL = L·Φ(L⁻¹ dK L⁻ᵀ), Φ = lower triangle with
    # the diagonal halved (the derivative of the Cholesky factor, Murray 2016).
    # With u = Lᵀ d_s and P = Φ(u ξᵀ), d_sᵀ L Φ(L⁻¹ dK L⁻ᵀ) ξ = Σ (L⁻ᵀ P L⁻¹) ∘ dK: one
    # B×B product pair serves both kernel parameters instead of two pairs per parameter.
    # An explicit inverse of a small well-conditioned L: faster than LAPACK's triangular
    # solves, which are slow for small matrices on busy machines.
    chol_inv = np.linalg.inv(fwd.chol)
    u = fwd.chol.T @ d_s
    outer = np.tril(np.outer(u, xi))
    outer[np.diag_indices_from(outer)] *= 0.5
    weighted = (chol_inv.T @ outer @ chol_inv) * fwd.rbf  # dK/dlog_v = rbf
    grads = [
        float((weighted * fwd.sq_dist).sum()) / math.exp(2.0 * phi[2]),  # dK/dlog_ell
        float(weighted.sum()),
    ]
    return np.array([float(d_s @ z), float(d_s.sum()), *grads])


@ALLOCATORS.register("gaussian")
class GaussianAllocator(Allocator):
    name = "gaussian"

    def __init__(
        self,
        *,
        lr: float = 0.05,  # Adam step on φ
        jitter: float = 1e-6,  # added to K's diagonal (ties in z make K singular)
        a: float = 0.0,  # initial slope of the mean score in z (0 = no preference)
        c: float = 1.0,  # initial offset of the mean score
        ell: float = 1.0,  # initial kernel length scale, in standard deviations of loss
        v: float = 0.1,  # initial kernel variance (small: near uniform at start)
    ) -> None:
        checks = {
            "lr": (lr, "> 0"),
            "jitter": (jitter, "> 0"),
            "ell": (ell, "> 0"),
            "v": (v, "> 0"),
        }
        for arg, (value, allowed) in checks.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{arg}={value} must be finite and {allowed}")
        for arg, value in (("a", a), ("c", c)):
            if not math.isfinite(value):
                raise ValueError(f"{arg}={value} must be finite")
        self.lr = float(lr)
        self.jitter = float(jitter)
        self.phi = np.clip(
            np.array([a, c, math.log(ell), math.log(v)], dtype=np.float64), _LOWER, _UPPER
        )
        self.adam_m = np.zeros(4)
        self.adam_v = np.zeros(4)
        self.step = 0
        self._last: tuple | None = None  # (φ, z, ξ, budget, n_min, forward) of the last pass

    def _forward(self, z: np.ndarray, xi: np.ndarray, budget: int, n_min: int) -> _Forward:
        """ñ at the current φ; update() reuses allocate()'s pass (a Cholesky of K) when
        φ and the inputs are unchanged — the same values, computed once."""
        last = self._last
        if (
            last is not None
            and last[3:5] == (budget, n_min)
            and np.array_equal(last[0], self.phi)
            and np.array_equal(last[1], z)
            and np.array_equal(last[2], xi)
        ):
            return last[5]
        fwd = _forward(self.phi, z, xi, budget, n_min, self.jitter)
        self._last = (self.phi.copy(), z.copy(), xi.copy(), budget, n_min, fwd)
        return fwd

    @property
    def params(self) -> dict[str, float]:
        a, c, log_ell, log_v = self.phi
        return {"a": float(a), "c": float(c), "ell": math.exp(log_ell), "v": math.exp(log_v)}

    def allocate(self, request: AllocationRequest) -> Allocation:
        batch = len(request.ids)
        rng = np.random.default_rng(request.seed)
        z = standardise(request.losses)
        xi = rng.standard_normal(batch)
        fwd = self._forward(z, xi, request.budget, request.n_min)
        continuous = fwd.continuous
        counts = round_to_budget(continuous, request.budget, request.n_min, rng)
        return Allocation(counts, continuous, {"z": z, "xi": xi})

    def update(
        self, request: AllocationRequest, allocation: Allocation, measured: np.ndarray
    ) -> dict[str, float]:
        batch = len(request.ids)
        measured = np.asarray(measured, dtype=np.float64)
        if measured.shape != (batch,):
            raise ValueError(f"measured has shape {measured.shape}, expected ({batch},)")
        valid = np.isfinite(measured)
        if (measured[valid] < 0).any():
            raise ValueError(f"measured variances must be >= 0, got min {measured[valid].min()}")
        if "z" not in allocation.extras or "xi" not in allocation.extras:
            raise ValueError("allocation lacks extras 'z'/'xi'; it was not made by this allocator")
        extra = request.budget - batch * request.n_min
        total = measured[valid].sum()
        if extra == 0 or not valid.any() or total <= 0:
            return {**self.params, "updated": 0.0}  # nothing to learn from

        z = np.asarray(allocation.extras["z"], dtype=np.float64)
        xi = np.asarray(allocation.extras["xi"], dtype=np.float64)
        objective, grad = self.objective_and_gradient(
            z, xi, np.where(valid, measured, 0.0), request.budget, request.n_min
        )
        self.step += 1
        self.adam_m = _BETA1 * self.adam_m + (1 - _BETA1) * grad
        self.adam_v = _BETA2 * self.adam_v + (1 - _BETA2) * grad**2
        m_hat = self.adam_m / (1 - _BETA1**self.step)
        v_hat2 = self.adam_v / (1 - _BETA2**self.step)
        self.phi = np.clip(self.phi - self.lr * m_hat / (np.sqrt(v_hat2) + _EPS), _LOWER, _UPPER)
        return {**self.params, "objective": objective, "updated": 1.0}

    def objective_and_gradient(
        self, z: np.ndarray, xi: np.ndarray, measured: np.ndarray, budget: int, n_min: int
    ) -> tuple[float, np.ndarray]:
        """J(φ)/J_uniform and its pathwise gradient w.r.t. φ = (a, c, log ℓ, log v).

        ``measured`` must be finite and >= 0 with a positive sum (zeros drop out of J).
        """
        batch = len(z)
        fwd = self._forward(z, xi, budget, n_min)
        weight = measured / (measured.sum() * batch / budget)  # J_uniform = 1
        objective = float((weight / fwd.continuous).sum())
        d_n = -weight / fwd.continuous**2
        grad = _gradient(fwd, self.phi, z, xi, d_n, budget - batch * n_min)
        return objective, grad

    def state_dict(self) -> dict[str, Any]:
        return {
            "phi": dict(zip(PARAM_NAMES, map(float, self.phi), strict=True)),
            "adam_m": [float(x) for x in self.adam_m],
            "adam_v": [float(x) for x in self.adam_v],
            "step": int(self.step),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"phi", "adam_m", "adam_v", "step"}
        if set(state) != expected:
            raise ValueError(
                f"gaussian allocator state needs keys {sorted(expected)}, got {sorted(state)}"
            )
        phi = state["phi"]
        if set(phi) != set(PARAM_NAMES):
            raise ValueError(f"state['phi'] needs keys {list(PARAM_NAMES)}, got {sorted(phi)}")
        self.phi = np.array([float(phi[k]) for k in PARAM_NAMES])
        self.adam_m = np.array(state["adam_m"], dtype=np.float64).reshape(4)
        self.adam_v = np.array(state["adam_v"], dtype=np.float64).reshape(4)
        self.step = int(state["step"])
