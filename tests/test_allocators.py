"""Allocators: budget invariants for every registered allocator, the optimal allocation of
docs/METHOD.md §4, the variance and unbiasedness of the batch estimator (§3), and learning in
the FLOPS allocator (§5)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from fqa.allocators import (
    ALLOCATORS,
    Allocation,
    AllocationRequest,
    Allocator,
    create_allocator,
    list_allocators,
)
from fqa.allocators.rounding import round_to_budget, water_fill

# -- helpers ---------------------------------------------------------------------------


def _random_request(rng: np.random.Generator, seed: int | None = None) -> AllocationRequest:
    """A random request covering the edge cases: B=1, budget == B·n_min, tied or constant
    losses, NaN variances, unobserved datapoints."""
    batch = int(rng.choice([1, 2, 3, 7, 16, 33]))
    n_min = int(rng.integers(1, 4))
    extra = int(
        rng.choice([0, 1, batch - 1, batch, 3 * batch + 5, int(rng.integers(0, 10 * batch + 1))])
    )
    kind = rng.integers(4)
    if kind == 0:
        losses = rng.exponential(size=batch)
    elif kind == 1:
        losses = np.full(batch, 0.7)  # constant: z-scores undefined
    elif kind == 2:
        losses = rng.integers(0, 3, size=batch).astype(float)  # heavy ties
    else:
        losses = rng.normal(size=batch) * 1e3
    variance = (1 + rng.exponential(size=batch)) ** 2 * rng.choice([1e-6, 1.0, 1e6])
    observations = rng.integers(0, 5, size=batch).astype(float)
    variance[observations == 0] = np.nan
    variance[rng.random(batch) < 0.2] = np.nan
    observations[np.isnan(variance)] = 0
    oracle = variance.copy()
    oracle[np.isnan(oracle)] = rng.exponential()
    if rng.random() < 0.2:
        oracle[:] = 0.0  # degenerate: nothing to allocate on
    return AllocationRequest(
        ids=rng.choice(10_000, size=batch, replace=False).astype(np.int64),
        losses=losses,
        budget=batch * n_min + extra,
        n_min=n_min,
        seed=int(rng.integers(2**31)) if seed is None else seed,
        variance=variance,
        observations=observations,
        oracle_variance=oracle,
    )


def _measured(request: AllocationRequest, rng: np.random.Generator) -> np.ndarray:
    """Plausible measured v̂ (grows with loss), with a few NaNs."""
    losses = np.nan_to_num(request.losses)
    measured = (1 + np.abs(losses - losses.min()) / (1 + np.ptp(losses))) ** 4
    measured[rng.random(len(measured)) < 0.1] = np.nan
    return measured


def _variance(v: np.ndarray, counts: np.ndarray) -> float:
    """Var(ĝ) of METHOD §3 up to the common 1/B² factor."""
    return float((v / counts).sum())


def _check_allocation(alloc: Allocation, request: AllocationRequest) -> None:
    counts = alloc.counts
    assert isinstance(alloc, Allocation)
    assert np.issubdtype(counts.dtype, np.integer)
    assert counts.shape == (len(request.ids),)
    assert int(counts.sum()) == request.budget
    assert counts.min() >= request.n_min
    assert alloc.continuous.shape == counts.shape
    assert alloc.continuous.sum() == pytest.approx(request.budget, rel=1e-9)
    assert alloc.continuous.min() >= request.n_min - 1e-9
    assert np.abs(counts - alloc.continuous).max() < 1 + 1e-9  # rounding moves < 1 sample


# -- registry and invariants for every allocator ---------------------------------------


def test_registry_lists_every_allocator():
    assert set(list_allocators()) >= {"uniform", "neyman", "gaussian", "bernoulli", "oracle"}
    for name in list_allocators():
        allocator = create_allocator(name)  # all constructible with defaults
        assert isinstance(allocator, Allocator)
        assert allocator.name == name
        assert allocator.needs_oracle == (name == "oracle")
    with pytest.raises(ValueError, match="unknown allocator 'nope'.*uniform"):
        create_allocator("nope")
    with pytest.raises(ValueError, match="registered twice"):
        ALLOCATORS.register("uniform")(object)


@pytest.mark.parametrize("name", list_allocators())
def test_budget_invariants_and_determinism(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # str hash is salted per run
    allocator = create_allocator(name)
    for _ in range(60):
        request = _random_request(rng)
        alloc = allocator.allocate(request)
        _check_allocation(alloc, request)
        again = create_allocator(name)
        again.load_state_dict(json.loads(json.dumps(allocator.state_dict())))
        np.testing.assert_array_equal(again.allocate(request).counts, alloc.counts)
        np.testing.assert_array_equal(allocator.allocate(request).counts, alloc.counts)
        metrics = allocator.update(request, alloc, _measured(request, rng))
        assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("name", list_allocators())
def test_state_dict_survives_json_round_trip(name):
    rng = np.random.default_rng(7)
    trained = create_allocator(name)
    for step in range(30):
        request = _random_request(rng, seed=step)
        trained.update(request, trained.allocate(request), _measured(request, rng))
    state = json.loads(json.dumps(trained.state_dict()))
    fresh = create_allocator(name)
    fresh.load_state_dict(state)
    for _ in range(20):
        request = _random_request(rng)
        a, b = trained.allocate(request), fresh.allocate(request)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.continuous, b.continuous)
        measured = _measured(request, rng)
        assert trained.update(request, a, measured) == fresh.update(request, b, measured)
    assert trained.state_dict() == fresh.state_dict()


def test_stateless_allocators_reject_state():
    for name in ("uniform", "neyman", "bernoulli", "oracle"):
        with pytest.raises(ValueError, match="no state"):
            create_allocator(name).load_state_dict({"a": 1.0})
    with pytest.raises(ValueError, match="keys"):
        create_allocator("gaussian").load_state_dict({"phi": {}})


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("bernoulli", {"p": -0.1}, r"p=-0.1 must be in \[0, 1\]"),
        ("bernoulli", {"p": 1.5}, r"p=1.5 must be in \[0, 1\]"),
        ("neyman", {"prior_strength": -1.0}, "prior_strength=-1.0 must be finite and >= 0"),
        ("neyman", {"prior_strength": float("nan")}, "prior_strength=nan"),
        ("gaussian", {"lr": 0.0}, "lr=0.0 must be finite and > 0"),
        ("gaussian", {"lr": -1.0}, "lr=-1.0"),
        ("gaussian", {"jitter": 0.0}, "jitter=0.0 must be finite and > 0"),
        ("gaussian", {"ell": -1.0}, "ell=-1.0"),
        ("gaussian", {"v": 0.0}, "v=0.0"),
        ("gaussian", {"a": float("inf")}, "a=inf must be finite"),
    ],
)
def test_bad_constructor_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_allocator(name, **kwargs)


def test_constructor_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        ALLOCATORS._factories["bernoulli"](0.3)


# -- water-filling and rounding (METHOD §4) --------------------------------------------


def test_water_fill_closed_form_without_floor():
    rng = np.random.default_rng(0)
    w = rng.uniform(1.0, 2.0, size=20)
    n = water_fill(w, budget=400, n_min=1)
    np.testing.assert_allclose(n, 400 * w / w.sum(), rtol=1e-12)


def test_water_fill_satisfies_kkt_with_active_floor():
    rng = np.random.default_rng(1)
    for _ in range(200):
        batch = int(rng.integers(1, 40))
        n_min = int(rng.integers(1, 4))
        budget = batch * n_min + int(rng.integers(0, 5 * batch + 1))
        w = rng.exponential(size=batch) ** 3  # very unequal: the floor binds often
        w[rng.random(batch) < 0.2] = 0.0
        if w.sum() == 0:
            continue
        n = water_fill(w, budget, n_min)
        assert n.sum() == pytest.approx(budget, rel=1e-12)
        assert n.min() >= n_min
        # Optimality of min Σ w²/n (convex): above the floor n_i = λ·w_i with one common λ,
        # and every floored datapoint has λ·w_i <= n_min.
        above = n > n_min * (1 + 1e-9)
        if above.any():
            lam = n[above] / w[above]
            np.testing.assert_allclose(lam, lam[0], rtol=1e-9)
            assert (lam[0] * w[~above] <= n_min * (1 + 1e-9)).all()
            # and no feasible perturbation improves the objective
            i, j = np.flatnonzero(above)[0], int(np.argmin(n))
            better = n.copy()
            better[i] -= 1e-3
            better[j] += 1e-3
            assert (w**2 / better).sum() >= (w**2 / n).sum() - 1e-12
        else:
            np.testing.assert_allclose(n, budget / batch)


def test_water_fill_degenerate_weights():
    np.testing.assert_allclose(water_fill(np.zeros(5), 17, 2), np.full(5, 17 / 5))
    np.testing.assert_allclose(water_fill(np.full(4, np.nan), 12, 1), np.full(4, 3.0))
    np.testing.assert_allclose(water_fill(np.array([1.0, 9.0, 4.0]), 6, 2), np.full(3, 2.0))
    # a NaN weight takes the mean of the others
    np.testing.assert_allclose(water_fill(np.array([1.0, np.nan, 3.0]), 60, 1), [10.0, 20.0, 30.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        water_fill(np.array([1.0, -1.0]), 10, 1)
    with pytest.raises(ValueError, match="below"):
        water_fill(np.ones(3), 5, 2)


def test_round_to_budget_is_exact_and_seeded():
    rng = np.random.default_rng(2)
    for _ in range(200):
        batch = int(rng.integers(1, 30))
        n_min = int(rng.integers(1, 3))
        budget = batch * n_min + int(rng.integers(0, 4 * batch))
        cont = water_fill(rng.exponential(size=batch), budget, n_min)
        seed = int(rng.integers(1000))
        counts = round_to_budget(cont, budget, n_min, np.random.default_rng(seed))
        assert counts.dtype == np.int64
        assert counts.sum() == budget and counts.min() >= n_min
        assert np.abs(counts - cont).max() < 1
        np.testing.assert_array_equal(
            counts, round_to_budget(cont, budget, n_min, np.random.default_rng(seed))
        )
    # ties (10 over 3) go to a seeded random datapoint, not always the first
    winners = {
        int(np.argmax(round_to_budget(np.full(3, 10 / 3), 10, 1, np.random.default_rng(s))))
        for s in range(30)
    }
    assert winners == {0, 1, 2}
    with pytest.raises(ValueError, match="sum to budget"):
        round_to_budget(np.array([1.0, 2.0]), 4, 1, np.random.default_rng(0))


# -- the individual allocators -----------------------------------------------------------


def _request(losses, budget, n_min=1, seed=0, **kw) -> AllocationRequest:
    losses = np.asarray(losses, dtype=float)
    return AllocationRequest(
        ids=np.arange(len(losses)), losses=losses, budget=budget, n_min=n_min, seed=seed, **kw
    )


def test_uniform_spreads_remainder():
    request = _request(np.zeros(7), budget=7 * 4 + 3)
    counts = create_allocator("uniform").allocate(request).counts
    assert sorted(counts.tolist()) == [4] * 4 + [5] * 3


def test_oracle_matches_closed_form_and_needs_variances():
    v = np.array([1.0, 4.0, 9.0, 16.0])
    alloc = create_allocator("oracle").allocate(
        _request(np.zeros(4), budget=100, oracle_variance=v)
    )
    np.testing.assert_allclose(alloc.continuous, [10.0, 20.0, 30.0, 40.0])
    np.testing.assert_array_equal(alloc.counts, [10, 20, 30, 40])
    with pytest.raises(
        ValueError, match="oracle allocator is for benchmarks/tests; it needs true variances"
    ):
        create_allocator("oracle").allocate(_request(np.zeros(4), budget=100))


def test_neyman_with_trusted_history_is_water_filling():
    rng = np.random.default_rng(3)
    v = rng.exponential(size=12) ** 2
    request = _request(rng.normal(size=12), budget=60, n_min=2, variance=v)
    ney = create_allocator("neyman").allocate(request)
    np.testing.assert_allclose(ney.continuous, water_fill(np.sqrt(v), 60, 2))
    orc = create_allocator("oracle").allocate(_request(request.losses, 60, 2, oracle_variance=v))
    np.testing.assert_array_equal(ney.counts, orc.counts)


def test_neyman_shrinks_toward_loss_prediction():
    losses = np.linspace(0.0, 3.0, 10)
    sqrt_v = 1.0 + 2.0 * losses  # exactly linear in the loss
    variance = sqrt_v**2
    observations = np.array([5, 0, 3, 0, 1, 2, 0, 4, 0, 1], dtype=float)
    variance[observations == 0] = np.nan
    request = _request(losses, budget=1000, variance=variance, observations=observations)
    alloc = create_allocator("neyman", prior_strength=2.0).allocate(request)
    # the fit recovers sqrt(v) for unobserved datapoints; observed ones agree with it
    np.testing.assert_allclose(alloc.continuous, 1000 * sqrt_v / sqrt_v.sum(), rtol=1e-9)

    # one observed datapoint far off the line is pulled toward it by κ/(obs+κ)
    variance2 = np.where(np.isnan(variance), np.nan, sqrt_v**2)
    variance2[4] = 100.0  # observed once
    alloc2 = create_allocator("neyman", prior_strength=2.0).allocate(
        _request(losses, budget=1000, variance=variance2, observations=observations)
    )
    v = alloc2.extras["variance"]
    fit_points = ~np.isnan(variance2)
    x, y = losses[fit_points], np.sqrt(variance2[fit_points])
    slope, intercept = np.polyfit(x, y, 1)
    pred = np.maximum(intercept + slope * losses, 0) ** 2
    assert v[4] == pytest.approx((1 * 100.0 + 2.0 * pred[4]) / 3.0)
    assert v[1] == pytest.approx(pred[1])  # unobserved: the prediction
    assert v[0] == pytest.approx((5 * variance2[0] + 2.0 * pred[0]) / 7.0)


def test_neyman_fallbacks():
    losses = np.array([0.1, 0.5, 0.9, 2.0, 3.0])
    # nothing observed: exactly the uniform allocation (same seed, same tie-breaking)
    request = _request(losses, budget=23, seed=5)
    np.testing.assert_array_equal(
        create_allocator("neyman").allocate(request).counts,
        create_allocator("uniform").allocate(request).counts,
    )
    # two observed: no fit, unobserved datapoints get the mean of sqrt(v̂)
    variance = np.array([4.0, 16.0, np.nan, np.nan, np.nan])
    obs = np.array([10.0, 10.0, 0, 0, 0])
    v = (
        create_allocator("neyman", prior_strength=0.0)
        .allocate(_request(losses, 1000, variance=variance, observations=obs))
        .extras["variance"]
    )
    np.testing.assert_allclose(v, [4.0, 16.0, 9.0, 9.0, 9.0])
    # constant losses: a fit is degenerate, also the mean
    v = (
        create_allocator("neyman", prior_strength=0.0)
        .allocate(
            _request(
                np.ones(5),
                1000,
                variance=np.array([4.0, 16.0, 1.0, np.nan, np.nan]),
                observations=np.array([1.0, 1, 1, 0, 0]),
            )
        )
        .extras["variance"]
    )
    np.testing.assert_allclose(v[3:], [(7 / 3) ** 2] * 2)
    # a fit predicting negative sqrt(v) is clipped at 0 (such datapoints get n_min)
    alloc = create_allocator("neyman", prior_strength=0.0).allocate(
        _request(
            [0.0, 1.0, 2.0, 10.0],
            40,
            variance=np.array([9.0, 4.0, 1.0, np.nan]),
            observations=np.array([1.0, 1, 1, 0]),
        )
    )
    assert alloc.extras["variance"][3] == 0.0 and alloc.counts[3] == 1


def test_bernoulli_halves_easy_datapoints():
    losses = np.array([0.0, 0.1, 0.2, 5.0, 6.0, 7.0])  # mean 3.05: first three are easy
    uniform = create_allocator("uniform").allocate(_request(losses, 60)).counts
    np.testing.assert_array_equal(
        create_allocator("bernoulli", p=0.0).allocate(_request(losses, 60)).counts, uniform
    )
    alloc = create_allocator("bernoulli", p=1.0).allocate(_request(losses, 60))
    np.testing.assert_allclose(alloc.continuous, [5, 5, 5, 15, 15, 15])
    # never below n_min: a share of 3 halves to max(n_min=2, 1.5)
    alloc = create_allocator("bernoulli", p=1.0).allocate(_request(losses, 18, n_min=2))
    np.testing.assert_allclose(alloc.continuous, [2, 2, 2, 4, 4, 4])
    # with p = 0.5 about half of the easy datapoints are cut, reproducibly per seed
    cuts = [
        create_allocator("bernoulli").allocate(_request(losses, 60, seed=s)).extras["cut"]
        for s in range(400)
    ]
    rate = np.mean([c[:3].mean() for c in cuts])
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / 1200)
    assert not any(c[3:].any() for c in cuts)


# -- METHOD §3: variance and unbiasedness of the batch estimator ------------------------

_REPS = 20_000
_SE = 5.0  # tolerance in standard errors


def _synthetic_problem():
    """Per-datapoint gradients g_i and per-query variances v_i, hard datapoints noisier and
    with larger gradients (as when easy datapoints are learned)."""
    rng = np.random.default_rng(11)
    batch = 16
    losses = np.sort(rng.exponential(size=batch))
    v = (0.2 + losses) ** 2 * 4.0
    g = np.sqrt(v)  # g_i correlated with v_i, so n_i-weighting is visibly biased
    return losses, g, v


def _draw_estimates(g, v, counts, rng):
    """R repetitions of ĝ = (1/B) Σ_i (1/n_i) Σ_k ĝ_ik, and of the biased n_i-weighted mean."""
    owner = np.repeat(np.arange(len(g)), counts)
    samples = g[owner] + np.sqrt(v[owner]) * rng.standard_normal((_REPS, len(owner)))
    per_point = np.zeros((_REPS, len(g)))
    np.add.at(per_point.T, owner, samples.T)  # Σ_k ĝ_ik per datapoint
    unbiased = (per_point / counts).mean(axis=1)
    biased = samples.mean(axis=1)  # every query weighted equally: datapoint i gets n_i/N
    return unbiased, biased


def _mean_is_unbiased(estimates: np.ndarray, truth: float, variance: float) -> bool:
    return abs(estimates.mean() - truth) <= _SE * np.sqrt(variance / len(estimates))


@pytest.mark.parametrize("name", list_allocators())
def test_batch_estimator_variance_and_bias(name):
    losses, g, v = _synthetic_problem()
    batch = len(g)
    request = _request(
        losses, budget=4 * batch, variance=v, observations=np.full(batch, 10.0), oracle_variance=v
    )
    counts = create_allocator(name).allocate(request).counts
    unbiased, _ = _draw_estimates(g, v, counts, np.random.default_rng(12))
    theory = _variance(v, counts) / batch**2
    rel_se = np.sqrt(2.0 / (_REPS - 1))  # sampling SE of a variance estimate (Gaussian ĝ)
    assert abs(unbiased.var(ddof=1) / theory - 1) < _SE * rel_se
    assert _mean_is_unbiased(unbiased, g.mean(), theory)


def test_oracle_beats_uniform_and_n_weighting_is_caught():
    losses, g, v = _synthetic_problem()
    batch = len(g)
    request = _request(losses, budget=4 * batch, oracle_variance=v)
    uniform = create_allocator("uniform").allocate(request).counts
    oracle = create_allocator("oracle").allocate(request).counts
    gain = _variance(v, uniform) / _variance(v, oracle)
    assert gain > 1.3  # the problem is unequal enough to matter
    rng = np.random.default_rng(13)
    est_u, _ = _draw_estimates(g, v, uniform, rng)
    est_o, biased = _draw_estimates(g, v, oracle, rng)
    # the empirical gain matches the formula (ratio of two independent variance estimates)
    rel_se = np.sqrt(2 * 2.0 / (_REPS - 1))
    assert abs(est_u.var(ddof=1) / est_o.var(ddof=1) / gain - 1) < _SE * rel_se
    # weighting datapoint i by n_i: the same unbiasedness check rejects it
    biased_variance = (v * oracle).sum() / oracle.sum() ** 2
    assert not _mean_is_unbiased(biased, g.mean(), biased_variance)
    assert biased.mean() == pytest.approx((oracle * g).sum() / oracle.sum(), rel=1e-2)


# -- METHOD §5: the learned FLOPS allocator ---------------------------------------------


def test_gaussian_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    allocator = create_allocator("gaussian", a=0.7, c=0.3, ell=0.8, v=0.5)
    z, xi, measured = rng.normal(size=12), rng.normal(size=12), rng.exponential(size=12)
    _, grad = allocator.objective_and_gradient(z, xi, measured, budget=60, n_min=2)
    base = allocator.phi.copy()
    for k in range(4):
        step = np.zeros(4)
        step[k] = 1e-6
        allocator.phi = base + step
        plus, _ = allocator.objective_and_gradient(z, xi, measured, 60, 2)
        allocator.phi = base - step
        minus, _ = allocator.objective_and_gradient(z, xi, measured, 60, 2)
        assert grad[k] == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-9)
    allocator.phi = base


def _train_and_evaluate(vfun, steps: int, noisy: bool = False, learned: str = "gaussian"):
    """Train on random batches, then compare Σ v/n of the learned allocator, uniform and
    oracle."""
    batch, per = 32, 4
    allocator = create_allocator(learned)
    rng = np.random.default_rng(5)
    for step in range(steps):
        losses = rng.exponential(size=batch)
        request = _request(losses, budget=batch * per, seed=step)
        alloc = allocator.allocate(request)
        measured = vfun(losses)
        if noisy:  # v̂_i = mean of n_i squared Gaussian samples: v_i·χ²(n_i)/n_i
            measured = measured * rng.chisquare(alloc.counts) / alloc.counts
        allocator.update(request, alloc, measured)
    totals = np.zeros(3)
    for step in range(100):
        losses = rng.exponential(size=batch)
        v = vfun(losses)
        request = _request(losses, budget=batch * per, seed=10_000 + step, oracle_variance=v)
        totals += [
            _variance(v, create_allocator(name).allocate(request).counts)
            for name in ("uniform", "oracle")
        ] + [_variance(v, allocator.allocate(request).counts)]
    uniform, oracle, learned = totals
    return (
        allocator,
        (uniform - learned) / (uniform - oracle) if uniform > oracle else None,
        learned / uniform,
    )


@pytest.mark.parametrize("noisy", [False, True])
def test_gaussian_learns_to_favour_hard_datapoints(noisy):
    allocator, captured, _ = _train_and_evaluate(lambda loss: (1 + loss) ** 4, 300, noisy)
    assert allocator.params["a"] > 0.5
    assert captured >= 0.8  # of the oracle's variance reduction over uniform


def test_gaussian_stays_uniform_when_variance_is_flat():
    allocator, _, ratio = _train_and_evaluate(lambda loss: np.full(len(loss), 3.0), 300)
    assert abs(allocator.params["a"]) < 0.15
    assert ratio < 1.01  # Σ v/n within 1% of uniform
    request = _request(np.random.default_rng(6).exponential(size=32), budget=128)
    counts = allocator.allocate(request).counts
    assert np.abs(counts - 4).max() <= 1


def test_gaussian_update_ignores_nan_and_degenerate_steps():
    rng = np.random.default_rng(7)
    losses = rng.exponential(size=10)
    request = _request(losses, budget=50)
    measured = (1 + losses) ** 2
    with_nan, with_zero = create_allocator("gaussian"), create_allocator("gaussian")
    alloc = with_nan.allocate(request)
    nan_measured, zero_measured = measured.copy(), measured.copy()
    nan_measured[[1, 4]] = np.nan
    zero_measured[[1, 4]] = 0.0  # zeros drop out of J, exactly like ignored datapoints
    with_nan.update(request, alloc, nan_measured)
    with_zero.update(request, alloc, zero_measured)
    np.testing.assert_allclose(with_nan.phi, with_zero.phi, rtol=1e-12)
    assert with_nan.step == 1

    before = with_nan.state_dict()
    assert with_nan.update(request, alloc, np.full(10, np.nan))["updated"] == 0.0
    floor_request = _request(losses, budget=20, n_min=2)  # budget == B·n_min: nothing to move
    assert (
        with_nan.update(floor_request, with_nan.allocate(floor_request), measured)["updated"] == 0.0
    )
    assert with_nan.state_dict() == before
    with pytest.raises(ValueError, match=">= 0"):
        with_nan.update(request, alloc, -measured)
    with pytest.raises(ValueError, match="extras"):
        with_nan.update(request, Allocation(alloc.counts, alloc.continuous), measured)


def test_gaussian_objective_is_scale_free():
    rng = np.random.default_rng(8)
    allocator = create_allocator("gaussian", a=0.5, v=0.3)
    z, xi, measured = rng.normal(size=9), rng.normal(size=9), rng.exponential(size=9)
    j1, g1 = allocator.objective_and_gradient(z, xi, measured, 40, 1)
    j2, g2 = allocator.objective_and_gradient(z, xi, 1e6 * measured, 40, 1)
    assert j1 == pytest.approx(j2) and np.allclose(g1, g2)
    # uniform allocation of flat variances scores exactly 1
    flat = create_allocator("gaussian", v=1e-8, c=5.0)
    assert flat.objective_and_gradient(np.zeros(9), xi, np.ones(9), 45, 1)[0] == pytest.approx(
        1.0, rel=1e-5
    )


def test_gaussian_sees_standardised_losses():
    rng = np.random.default_rng(9)
    losses = rng.exponential(size=20)
    allocator = create_allocator("gaussian", a=1.5, v=0.2)
    alloc = allocator.allocate(_request(losses, budget=80, seed=3))
    z = alloc.extras["z"]
    assert z.mean() == pytest.approx(0.0, abs=1e-12) and z.std() == pytest.approx(1.0)
    # only the batch's relative losses matter: shifting and scaling them changes nothing
    moved = allocator.allocate(_request(1e3 * losses + 7.0, budget=80, seed=3))
    np.testing.assert_allclose(moved.continuous, alloc.continuous, rtol=1e-9)
    # constant losses (std 0) give z = 0 rather than NaN
    flat = allocator.allocate(_request(np.full(20, 2.5), budget=80, seed=3))
    assert not flat.extras["z"].any()


# -- the loss_curve allocator and its isotonic fit --------------------------------------


def _isotonic_by_min_max(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The classical closed form: r_i = max_{j<=i} min_{k>=i} weighted mean of y[j..k]."""
    n = len(y)

    def mean(j, k):
        return (w[j : k + 1] * y[j : k + 1]).sum() / w[j : k + 1].sum()

    return np.array(
        [max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]
    )


def test_isotonic_matches_the_min_max_formula():
    from fqa.allocators.isotonic import isotonic

    rng = np.random.default_rng(20)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        y, w = rng.normal(size=n), rng.uniform(0.1, 3.0, size=n)
        np.testing.assert_allclose(isotonic(y, w), _isotonic_by_min_max(y, w), rtol=1e-12)
    np.testing.assert_array_equal(isotonic(np.array([1.0, 2.0, 3.0])), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(isotonic(np.array([3.0, 1.0, 2.0])), [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="positive finite weights"):
        isotonic(np.array([1.0, 2.0]), np.array([1.0, 0.0]))


@pytest.mark.parametrize("noisy", [False, True])
def test_loss_curve_reaches_the_oracle_when_variance_grows_with_loss(noisy):
    """v a function of loss: the best loss-only allocation is the oracle's, and the fitted
    curve must capture nearly all of its reduction, even from χ²-noisy measurements."""
    _, captured, _ = _train_and_evaluate(
        lambda loss: (1 + loss) ** 4, 100, noisy, learned="loss_curve"
    )
    assert captured >= 0.95


def test_loss_curve_is_uniform_without_data_and_when_variance_is_flat():
    rng = np.random.default_rng(21)
    request = _request(rng.exponential(size=32), budget=128)
    assert np.abs(create_allocator("loss_curve").allocate(request).counts - 4).max() <= 1
    allocator, _, ratio = _train_and_evaluate(
        lambda loss: np.full(len(loss), 3.0), 100, learned="loss_curve"
    )
    assert ratio < 1.001  # Σ v/n within 0.1% of uniform
    np.testing.assert_allclose(allocator.predict(np.array([0.1, 1.0, 5.0])), 3.0)


def test_loss_curve_keeps_a_window_and_rejects_bad_input():
    allocator = create_allocator("loss_curve", window=3)
    rng = np.random.default_rng(22)
    for step in range(5):
        request = _request(rng.exponential(size=10), budget=40, seed=step)
        measured = np.full(10, float(step))
        measured[0] = np.nan  # skipped, not fitted
        allocator.update(request, allocator.allocate(request), measured)
    assert len(allocator.history) == 3
    assert (
        allocator.update(request, allocator.allocate(request), np.ones(10))["curve_points"] == 28
    )  # 9 + 9 + 10
    with pytest.raises(ValueError, match=">= 0"):
        allocator.update(request, allocator.allocate(request), -np.ones(10))
    with pytest.raises(ValueError, match="shape"):
        allocator.update(request, allocator.allocate(request), np.ones(3))
    with pytest.raises(ValueError, match="window=0 must be an integer >= 1"):
        create_allocator("loss_curve", window=0)
    with pytest.raises(ValueError, match="key 'history'"):
        create_allocator("loss_curve").load_state_dict({"phi": 1})
