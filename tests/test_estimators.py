"""The estimators against autograd on a timm ViT, with tolerances from their own variance."""

import numpy as np
import pytest
import torch

from fqa.estimators import create_estimator, list_estimators
from fqa.estimators.base import batch_weights
from fqa.estimators.lr import unestimated_parameters

SETTINGS = {"lr": {"sigma": 0.01}, "spsa": {"epsilon": 1e-4}}
IDS = np.arange(8)
COUNTS = np.array([1, 2, 3, 4, 1, 2, 3, 4])  # unequal on purpose: the 1/n_i weights matter


def _prepare(task, name):
    estimator = create_estimator(name, **SETTINGS[name])
    if name == "lr":
        params = dict(task.model.named_parameters())
        for frozen in unestimated_parameters(task.model, False):
            params[frozen].requires_grad_(False)
    return estimator


def _draws(task, estimator, reps, counts=COUNTS, reweight=None, shard_rows=64):
    baselines = task.prepass(IDS)["loss"]
    grads = []
    for rep in range(reps):
        shards = estimator.plan(IDS, counts, baselines, seed=rep, shard_rows=shard_rows)
        if reweight is not None:
            shards = [reweight(s) for s in shards]
        estimator.estimate(task, shards)
        grads.append(torch.cat([p.grad.flatten() for _, p in task.trainable_parameters()]))
    return torch.stack(grads)


def _z_scores(draws, truth):
    se = draws.std(0) / len(draws) ** 0.5
    return (draws.mean(0) - truth) / se


@pytest.mark.parametrize("name", list_estimators())
def test_estimator_is_unbiased_against_autograd(vit_task, name):
    estimator = _prepare(vit_task, name)
    truth = vit_task.autograd_gradient(IDS)
    z = _z_scores(_draws(vit_task, estimator, reps=300), truth)
    # Each coordinate's mean is off by z standard errors; unbiased => z ~ N(0, 1).
    # mean z² of thousands of coordinates concentrates near 1 (finite-sample t-tails
    # and the O(ε²) smoothing bias stay far inside these bounds).
    assert 0.8 < float((z**2).mean()) < 1.3
    assert float((z.abs() > 4.5).float().mean()) < 0.002


@pytest.mark.parametrize("name", list_estimators())
def test_weighting_datapoints_by_query_count_is_detected(vit_head_task, name):
    """The public code's bias (docs/METHOD.md §6): a datapoint weighted by n_i, not 1/n_i.

    Its expectation is Σ_i (n_i/Σn) g_i instead of (1/B) Σ_i g_i. Projecting each draw's
    error onto that bias direction d gives a t statistic that is N(0, 1) for an unbiased
    estimator and large for the biased one — so this check has the power the
    coordinate-wise test above lacks in high dimension.
    """
    task = vit_head_task
    estimator = _prepare(task, name)
    counts = np.array([1, 1, 1, 1, 1, 1, 1, 9])
    truth = task.autograd_gradient(IDS)
    per_example = torch.stack([task.autograd_gradient(IDS[i : i + 1]) for i in IDS])
    shares = torch.as_tensor(counts / counts.sum() - 1 / len(counts))
    direction = (shares[:, None] * per_example).sum(0)
    pooled = 1.0 / counts.sum()  # every sample weighted alike => datapoint i weighted by n_i

    def biased(shard):
        return type(shard)(shard.seed, shard.ids, np.full(len(shard), pooled), shard.baselines)

    def t_statistic(draws):
        projections = (draws - truth) @ direction
        return float(projections.mean() / (projections.std() / len(projections) ** 0.5))

    unbiased = t_statistic(_draws(task, estimator, reps=200, counts=counts))
    weighted_by_count = t_statistic(
        _draws(task, estimator, reps=200, counts=counts, reweight=biased)
    )
    assert abs(unbiased) < 4.0
    assert weighted_by_count > 6.0


@pytest.mark.parametrize("name", list_estimators())
def test_cosine_with_autograd_rises_with_queries(vit_head_task, name):
    task = vit_head_task
    estimator = _prepare(task, name)
    truth = task.autograd_gradient(IDS)

    def mean_cosine(per_datapoint):
        draws = _draws(task, estimator, reps=20, counts=np.full(8, per_datapoint))
        return float(torch.nn.functional.cosine_similarity(draws, truth[None], dim=1).mean())

    few, many = mean_cosine(1), mean_cosine(16)
    assert many > few + 0.1
    assert many > 1.5 * few


def test_spsa_restores_parameters_and_reuses_directions(vit_task):
    estimator = _prepare(vit_task, "spsa")
    before = [p.detach().clone() for _, p in vit_task.trainable_parameters()]
    baselines = vit_task.prepass(IDS)["loss"]
    shards = estimator.plan(IDS, COUNTS, baselines, seed=3, shard_rows=3)
    for shard in shards:
        estimator.evaluate(vit_task, shard)
    for old, (_, new) in zip(before, vit_task.trainable_parameters(), strict=True):
        assert torch.equal(new, old)  # bit-exact: θ is never written during a query
    # every datapoint uses directions 0..n_i-1: a direction's seed appears for each active point
    seeds = {s.seed for s in shards}
    assert len(seeds) == COUNTS.max()
    assert sum(len(s) for s in shards) == COUNTS.sum()


def test_spsa_estimate_does_not_depend_on_shard_size(vit_task):
    estimator = _prepare(vit_task, "spsa")
    small = _draws(vit_task, estimator, reps=2, shard_rows=2)
    large = _draws(vit_task, estimator, reps=2, shard_rows=64)
    torch.testing.assert_close(small, large, rtol=1e-9, atol=1e-12)


def test_spsa_restores_parameters_when_a_query_fails(vit_task):
    estimator = _prepare(vit_task, "spsa")
    before = [p.detach().clone() for _, p in vit_task.trainable_parameters()]
    shard = estimator.plan(IDS, COUNTS, vit_task.prepass(IDS)["loss"], seed=0, shard_rows=64)[0]
    original, calls = vit_task.losses, []

    def failing(ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("query failed")
        return original(ids)

    vit_task.losses = failing
    with pytest.raises(RuntimeError):
        estimator.evaluate(vit_task, shard)
    for old, (_, new) in zip(before, vit_task.trainable_parameters(), strict=True):
        assert torch.equal(new, old)  # bit-exact: θ is never written during a query


def test_nonfinite_losses_are_counted_and_zeroed(vit_task):
    estimator = _prepare(vit_task, "lr")
    shard = estimator.plan(IDS, COUNTS, vit_task.prepass(IDS)["loss"], seed=0, shard_rows=64)[0]
    original = vit_task.losses

    def poisoned(ids):
        losses = original(ids).clone()
        losses[0] = float("nan")
        return losses

    vit_task.losses = poisoned
    result = estimator.evaluate(vit_task, shard)
    assert result.nonfinite == 1
    assert all(torch.isfinite(g).all() for g in result.grads.values())


def test_batch_weights_divide_by_each_datapoints_count():
    weights = batch_weights(np.array([1, 2, 4]))
    np.testing.assert_allclose(weights, [1 / 3, 1 / 6, 1 / 12])
    with pytest.raises(ValueError, match="at least one sample"):
        batch_weights(np.array([1, 0]))


@pytest.mark.parametrize(
    "kwargs", [{"name": "lr", "sigma": 0.0}, {"name": "spsa", "epsilon": -1.0}]
)
def test_non_positive_perturbation_scale_is_rejected(kwargs):
    with pytest.raises(ValueError, match="must be > 0"):
        create_estimator(**kwargs)


@pytest.mark.parametrize(
    "module, x_shape",
    [
        (torch.nn.Linear(5, 3).double(), (6, 4, 5)),
        (torch.nn.Linear(5, 3).double(), (6, 5)),
        (torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double(), (6, 2, 7, 7)),
    ],
)
def test_lr_pair_gradient_equals_the_per_row_sum(module, x_shape):
    """Antithetic rows [+ε, −ε] folded into one half-size product: Σ_p ε_p ⊗ (c⁺x⁺ − c⁻x⁻)."""
    from fqa.estimators.lr import _layer_gradient, _pair_gradient

    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64)
    with torch.no_grad():
        half = torch.randn_like(module(x[:3]))
    c = torch.randn(6, dtype=torch.float64)
    noise = torch.cat([half, -half])
    expected = _layer_gradient(module, x, noise * c.view(-1, *[1] * (noise.dim() - 1)))
    got = _pair_gradient(module, x, half, lambda dtype: (c[:3], c[3:], c[:3] - c[3:]))
    assert set(got) == set(expected) == {"weight", "bias"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
