"""The estimators against autograd on a timm ViT, with tolerances from their own variance."""

import numpy as np
import pytest
import timm
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


@pytest.mark.parametrize(
    "module",
    [
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),  # few channels: the Gram form
        torch.nn.Conv2d(8, 16, 3, padding="same", dilation=2),
        torch.nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"),
        torch.nn.Conv2d(16, 24, 1, bias=False),  # many channels, few positions: the direct form
    ],
)
def test_conv_score_norm_is_the_norm_of_the_per_row_weight_gradient(module):
    """‖Σ_pos ε_pos ⊗ patch_pos‖² (+ bias) per row, against conv2d_weight on each row alone."""
    from fqa.estimators.lr import _layer_gradient, _score_norm_sq

    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(3, module.in_channels, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        noise = torch.randn_like(module(x))
    # reference: pad explicitly ("same", reflect), then the same conv without padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x_ref = torch.nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    reference = torch.nn.Conv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
    ).double()
    expected = torch.stack(
        [
            sum(
                g.pow(2).sum()
                for g in _layer_gradient(reference, x_ref[r : r + 1], noise[r : r + 1]).values()
            )
            for r in range(3)
        ]
    )
    torch.testing.assert_close(_score_norm_sq(module, x, noise), expected, rtol=1e-10, atol=0)


def test_linear_score_norm_from_probes_is_unbiased_with_the_closed_form_variance():
    """‖S z‖²/k with k Rademacher probes against the exact ‖S‖² (S = Σ_t ε_t x_tᵀ, the
    Gram form): the mean of N draws within 5 standard errors, the standard error from the
    closed form Var = 2(‖SᵀS‖²_F − Σ_j (SᵀS)_jj²)/k, and the sample variance near it."""
    from fqa.estimators.lr import _score_norm_sq

    torch.manual_seed(0)
    module = torch.nn.Linear(12, 10, bias=False).double()
    x = torch.randn(3, 40, 12, dtype=torch.float64)
    noise = torch.randn(3, 40, 10, dtype=torch.float64)
    exact = _score_norm_sq(module, x, noise)
    score = torch.einsum("rto,rti->roi", noise, x)
    torch.testing.assert_close(exact, score.pow(2).sum((1, 2)), rtol=1e-12, atol=0)
    k, draws = 4, 4000
    generator = torch.Generator().manual_seed(1)
    estimates = torch.stack(
        [
            _score_norm_sq(
                module,
                x,
                noise,
                torch.randint(0, 2, (12, k), generator=generator).double().mul_(2).sub_(1),
            )
            for _ in range(draws)
        ]
    )
    gram = score.transpose(1, 2) @ score  # SᵀS per row
    variance = 2 * (gram.pow(2).sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(1)) / k
    z = (estimates.mean(0) - exact) / (variance / draws).sqrt()
    assert float(z.abs().max()) < 5, z
    ratio = estimates.var(0) / variance  # chi-square-like spread: a few % at 4000 draws
    assert float((ratio - 1).abs().max()) < 0.2, ratio


def test_lr_score_probes_change_only_the_statistic_and_keep_its_scale():
    """Probes replace the exact score norm only: gradients and values bit-identical, the
    same draw twice gives the same statistic, and over many shards the mean squared
    statistic agrees with the exact one."""
    from tests.conftest import make_vit_task

    task = make_vit_task("full")
    for frozen in unestimated_parameters(task.model, False):
        dict(task.model.named_parameters())[frozen].requires_grad_(False)
    exact = create_estimator("lr", sigma=0.01, score_probes=0)
    probed = create_estimator("lr", sigma=0.01, score_probes=4)  # 17 tokens >= 2*4
    baselines = task.prepass(IDS)["loss"]
    squares = {"exact": [], "probed": []}
    for seed in range(30):
        shard = exact.plan(IDS, np.ones(8, dtype=int), baselines, seed, 64)[0]
        a, b = exact.evaluate(task, shard), probed.evaluate(task, shard)
        if seed == 0:
            assert np.array_equal(a.values, b.values)
            assert all(torch.equal(a.grads[key], b.grads[key]) for key in a.grads)
            assert not np.array_equal(a.stat_values, b.stat_values)  # probes were used
            assert np.array_equal(probed.evaluate(task, shard).stat_values, b.stat_values)
        squares["exact"].append(a.stat_values**2)
        squares["probed"].append(b.stat_values**2)
    # same shards, so only the probes differ: their relative error per draw is small
    # (averaged over ~10 layers), and its mean over 240 draws must be near 0
    exact_sq, probed_sq = np.concatenate(squares["exact"]), np.concatenate(squares["probed"])
    relative = probed_sq / exact_sq - 1
    se = relative.std() / len(relative) ** 0.5
    assert abs(relative.mean()) < 5 * se + 1e-12, (relative.mean(), se)


def test_lr_rejects_a_negative_probe_count():
    with pytest.raises(ValueError, match="score_probes=-1"):
        create_estimator("lr", score_probes=-1)


def _conv_task():
    """A random resnet10t (float64) on 16x16 single-channel images, every conv trainable."""
    from tests.conftest import TensorTask

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1).eval().double()
    params = dict(model.named_parameters())
    for frozen in unestimated_parameters(model, True):  # BatchNorm: invisible to lr
        params[frozen].requires_grad_(False)
    return TensorTask(model, torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.arange(4))


@pytest.mark.parametrize("antithetic", [False, True])
def test_lr_statistic_is_the_size_of_the_estimate_on_a_conv_model(antithetic):
    """The per-sample statistic allocators read as v_i: E[stat²] = E‖ĝ_i‖² with hooked convs.

    One sample of one datapoint per draw (weight 1), so the shard's gradient is ĝ_i itself.
    Without antithetic pairs stat = ‖ĝ_i‖ exactly, draw by draw. With pairs the statistic
    uses the + row's layer inputs (a layer's input moves by O(σ) with the noise upstream),
    so it matches in expectation: within 4 standard errors of the paired difference plus
    a 2% allowance for that O(σ) term. The dense formula ‖ε‖²‖x‖² was 7.5× too large here.
    """
    from fqa.estimators.base import Shard

    task = _conv_task()
    estimator = create_estimator("lr", sigma=0.01, hook_conv=True, antithetic=antithetic)
    baseline = task.prepass(np.arange(4))["loss"][1:2]
    stat_sq, grad_sq = [], []
    for seed in range(20 if not antithetic else 100):
        result = estimator.evaluate(task, Shard(seed, np.array([1]), np.array([1.0]), baseline))
        stat_sq.append(float(result.stat_values[0]) ** 2)
        grad_sq.append(sum(float(g.pow(2).sum()) for g in result.grads.values()))
    stat_sq, grad_sq = np.array(stat_sq), np.array(grad_sq)
    if not antithetic:
        np.testing.assert_allclose(stat_sq, grad_sq, rtol=1e-9)
        return
    diff = stat_sq - grad_sq
    tolerance = 4 * diff.std(ddof=1) / np.sqrt(len(diff)) + 0.02 * grad_sq.mean()
    assert abs(diff.mean()) < tolerance, (stat_sq.mean(), grad_sq.mean(), tolerance)


def _stored_noise_gradient(task, estimator, shard):
    """The former lr product, kept as the reference: every layer's (x, ε) stored during
    the forward, Σ_r c_r ε_r x_rᵀ formed afterwards from the stored tensors."""
    from fqa.estimators.lr import _GradientProduct, _NoiseInjector, hooked_modules

    modules = hooked_modules(task.model, False)
    samples = len(shard)
    stored = []
    injector = _NoiseInjector(
        modules,
        estimator.sigma,
        shard.seed,
        samples,
        lambda module, x, noise, state: stored.append((module, x, noise.clone())),
        source=estimator.noise_source,
    )
    try:
        losses = task.losses(np.concatenate([shard.ids, shard.ids])).double()
    finally:
        injector.remove()
    advantage = losses - torch.as_tensor(np.tile(shard.baselines, 2))
    # the pair's two rows share its weight: /2
    coefficient = advantage * torch.as_tensor(np.tile(shard.weights, 2)) / (2 * estimator.sigma)
    product = _GradientProduct(modules, coefficient, samples, True)
    for module, x, noise in stored:
        product.add(module, x, noise)
    return product.grads, product.score_sq


@pytest.mark.parametrize("source", ["auto", "torch"])
@pytest.mark.parametrize(
    "memory",
    [{"recompute_hidden": False}, {"two_pass": True}, {}],
    ids=["single", "two", "hidden"],
)
def test_lr_regenerated_noise_gives_the_stored_noise_estimate(memory, source):
    """Not storing ε (regenerated from its stream mark, a second accumulating forward,
    or the MLPs' hidden activations recomputed) must not change the estimate: float64,
    against the stored-ε product, with either noise source."""
    from tests.conftest import make_vit_task

    task = make_vit_task("full")
    estimator = create_estimator("lr", sigma=0.01, noise_source=source, **memory)
    for frozen in unestimated_parameters(task.model, False):
        dict(task.model.named_parameters())[frozen].requires_grad_(False)
    shard = estimator.plan(IDS, np.ones(8, dtype=int), task.prepass(IDS)["loss"], 3, 64)[0]
    result = estimator.evaluate(task, shard)
    expected, score_sq = _stored_noise_gradient(task, estimator, shard)
    assert set(result.grads) == set(expected) and len(expected) > 4
    for key, grad in expected.items():
        torch.testing.assert_close(result.grads[key], grad, rtol=1e-12, atol=1e-15)
    stat = np.abs(result.values) * score_sq.sqrt().numpy() / estimator.sigma
    np.testing.assert_allclose(result.stat_values, stat, rtol=1e-12)


def _lr_results(task, ids, seed=3, **settings):
    """The same shard's lr result with each of ``settings`` (dicts of estimator kwargs)."""
    results, baselines = [], task.prepass(ids)["loss"]
    for kwargs in settings.values():
        estimator = create_estimator("lr", sigma=0.05, **kwargs)
        shard = estimator.plan(ids, np.ones(len(ids), dtype=int), baselines, seed, 64)[0]
        torch.manual_seed(0)  # active dropout (below) draws the same masks in both
        results.append(estimator.evaluate(task, shard))
    return results


def _assert_identical(a, b):
    assert set(a.grads) == set(b.grads) and len(a.grads) > 2
    for key in a.grads:
        assert torch.equal(a.grads[key], b.grads[key]), key
    np.testing.assert_array_equal(a.stat_values, b.stat_values)


def test_lr_recompute_hidden_replays_the_mlp_bit_for_bit_under_bf16_autocast():
    """The replay runs the MLP under the autocast its forward ran under: the same bf16
    hidden activation, so the same estimate to the bit as keeping it (a replay in fp32
    would differ in every product of the MLPs' second layers)."""
    from fqa.estimators.lr import hidden_layers, hooked_modules
    from tests.test_device import Bf16Task

    task = Bf16Task("full")
    for frozen in unestimated_parameters(task.model, False):
        dict(task.model.named_parameters())[frozen].requires_grad_(False)
    hidden = hidden_layers(task.model, hooked_modules(task.model, False))
    assert [h.target for h in hidden] == [block.mlp.fc2 for block in task.model.blocks]
    kept, replayed = _lr_results(task, IDS, kept={"recompute_hidden": False}, replayed={})
    _assert_identical(kept, replayed)


class _MlpAround(torch.nn.Module):
    """fc1 → relu → ``middle`` → fc2: an MLP whose middle a replay must not repeat."""

    def __init__(self, middle: torch.nn.Module):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 24), torch.nn.Linear(24, 3)
        self.middle = middle

    def forward(self, x):
        return self.fc2(self.middle(torch.relu(self.fc1(x))))


def test_lr_recompute_hidden_keeps_the_activation_where_dropout_would_redraw():
    """An MLP in training mode with active dropout would draw a new mask in a replay:
    its hidden activation is kept instead, so the estimate still equals the kept one."""
    from tests.conftest import TensorTask

    torch.manual_seed(0)
    model = torch.nn.Sequential(_MlpAround(torch.nn.Dropout(0.5))).double().train()
    task = TensorTask(model, torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    kept, replayed = _lr_results(task, IDS, kept={"recompute_hidden": False}, replayed={})
    _assert_identical(kept, replayed)
    model.eval()  # no dropout: replayed, and still the same
    kept, replayed = _lr_results(task, IDS, kept={"recompute_hidden": False}, replayed={})
    _assert_identical(kept, replayed)


@pytest.mark.parametrize("gate_first", [True, False])
def test_lr_recompute_hidden_replays_a_gated_mlp_with_its_other_layers_noise(
    gate_first, monkeypatch
):
    """A gated MLP (gate and up both read the input, down the wider hidden activation):
    the replay adds the up layer's noise from its saved generator state as well. When
    the forward runs a layer before the one registered first, no replay is attempted
    and the activation is kept. Either way, the same estimate to the bit."""
    import fqa.estimators.lr as lr
    from tests.conftest import TensorTask

    class GatedMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(6, 16), torch.nn.Linear(6, 16)
            self.down = torch.nn.Linear(16, 3)

        def forward(self, x):
            up = self.up(x) if not gate_first else None
            gate = torch.sigmoid(self.gate(x))
            return self.down(gate * (self.up(x) if gate_first else up))

    torch.manual_seed(0)
    model = torch.nn.Sequential(GatedMlp()).double().eval()
    task = TensorTask(model, torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    replays = []
    replay = lr._replay_hidden
    monkeypatch.setattr(lr, "_replay_hidden", lambda *a: replays.append(1) or replay(*a))
    kept, replayed = _lr_results(task, IDS, kept={"recompute_hidden": False}, replayed={})
    _assert_identical(kept, replayed)
    assert len(replays) == (1 if gate_first else 0)


def test_lr_recompute_hidden_is_the_default_and_two_pass_overrides_it():
    assert create_estimator("lr").recompute_hidden
    assert not create_estimator("lr", two_pass=True).recompute_hidden  # nothing kept to spare


def test_lr_recompute_hidden_keeps_the_activation_where_batch_norm_would_update_again():
    """Batch norm in training mode updates its running statistics on every call: a replay
    would count the batch twice. The activation is kept instead, so the statistics move
    exactly as without recompute_hidden, and the estimate is the same."""
    import copy

    from tests.conftest import TensorTask

    torch.manual_seed(0)
    model = torch.nn.Sequential(_MlpAround(torch.nn.BatchNorm1d(24))).double().train()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    results, means = [], []
    for settings in ({"recompute_hidden": False}, {}):
        task = TensorTask(copy.deepcopy(model), x, y)
        results += _lr_results(task, IDS, only=settings)
        means.append(task.model[0].middle.running_mean.clone())
    _assert_identical(*results)
    assert torch.equal(means[0], means[1])


def test_lr_leaves_multihead_attention_out_proj_unhooked():
    """nn.MultiheadAttention never calls its out_proj Linear: no hook there (it would never
    fire), and its weights count as unestimated, so they are frozen, not silently zero."""
    from fqa.estimators.lr import hooked_modules

    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 2))
    assert [name for name, _ in hooked_modules(model, False)] == ["1"]
    assert set(unestimated_parameters(model, False)) == {
        "0.in_proj_weight",
        "0.in_proj_bias",
        "0.out_proj.weight",
        "0.out_proj.bias",
    }


def test_lr_rejects_a_hooked_layer_the_forward_never_calls():
    from fqa.tasks.base import Task

    class Bypass(torch.nn.Module):  # uses its Linear's weight directly, as MHA does
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.inner.weight, self.inner.bias)

    class Tiny(Task):
        model = Bypass()

        def losses(self, ids):
            with torch.inference_mode():
                return self.model(torch.ones(len(ids), 4)).sum(1)

        prepass = evaluate = train_ids = None

    estimator = create_estimator("lr", sigma=0.1)
    shard = estimator.plan(np.arange(2), np.ones(2, dtype=int), np.zeros(2), 0, 8)[0]
    with pytest.raises(ValueError, match="inner.*never called"):
        estimator.evaluate(Tiny(), shard)


@pytest.mark.parametrize("name", list_estimators())
def test_count_weighting_has_the_count_weighted_expectation(vit_head_task, name, caplog):
    """``weighting: count`` (the FLOPS code's repeat-and-average) is E = Σ_i (n_i/Σn) g_i.

    The t statistic of the draws' error along the bias direction (closed form − truth)
    is N(0, 1) against the closed form and large against the true gradient (the head's
    few, strongly coupled coordinates make the coordinate-wise z test too coarse here).
    The planned weights are exactly 1/Σn for every sample."""
    from fqa.estimators import base

    task = vit_head_task
    _prepare(task, name)
    base._warned_count.clear()  # the warning is logged once per process
    with caplog.at_level("WARNING"):
        estimator = create_estimator(name, weighting="count", **SETTINGS[name])
        create_estimator(name, weighting="count", **SETTINGS[name])
    assert caplog.text.count("BIASED") == 1
    counts = np.array([1, 1, 1, 1, 1, 1, 1, 9])
    per_example = torch.stack([task.autograd_gradient(IDS[i : i + 1]) for i in IDS])
    weights = torch.as_tensor(counts / counts.sum())
    closed_form = (weights[:, None] * per_example).sum(0)
    truth = per_example.mean(0)
    shards = estimator.plan(IDS, counts, np.zeros(8), seed=0, shard_rows=64)
    np.testing.assert_allclose(np.concatenate([s.weights for s in shards]), 1 / counts.sum())
    draws = _draws(task, estimator, reps=200, counts=counts)
    direction = closed_form - truth

    def t_statistic(reference):
        projections = (draws - reference) @ direction
        return float(projections.mean() / (projections.std() / len(projections) ** 0.5))

    assert abs(t_statistic(closed_form)) < 4.0
    assert t_statistic(truth) > 6.0


def test_unknown_weighting_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"weighting='n'.*'unbiased'.*'count'"):
        create_estimator("lr", weighting="n")


@pytest.mark.parametrize("pairs", [3, None])
def test_lr_noisy_linear_matches_the_plain_forward_plus_noise(pairs):
    """The fused query forward, xWᵀ accumulated into b ± σε, against the hook's path
    (the plain forward, then ± σε), which runs where autograd records: the same
    outputs to float64 rounding and the same ε handed on, with and without a bias and
    for a Linear subclass that keeps the hook. The class forward is back afterwards."""
    from fqa.estimators.lr import _NoiseInjector

    class Scaled(torch.nn.Linear):  # its own forward: the hook path, never fused
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4, bias=False), Scaled(4, 3)
    ).double()
    modules = [(name, m) for name, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(6, 2, 5, dtype=torch.float64)

    def noisy_forward(grad: bool):
        handed = []
        injector = _NoiseInjector(modules, 0.3, 11, pairs, lambda m, x, n, s: handed.append(n))
        try:
            with torch.set_grad_enabled(grad):
                out = model(x)
        finally:
            injector.remove()
        return out.detach(), handed

    fused, fused_noise = noisy_forward(False)
    plain, plain_noise = noisy_forward(True)
    assert len(fused_noise) == len(plain_noise) == 3
    for a, b in zip(fused_noise, plain_noise, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(fused, model(x), atol=1e-3)  # the noise is in there
    assert all("forward" not in m.__dict__ for _, m in modules)
