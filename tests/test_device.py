"""Device placement, device-independent spsa noise, bf16 on CPU; CUDA-only checks carry `gpu`."""

import numpy as np
import torch

from fqa.noise import direction, parameter_key, sign_bits

N = 20_000


def test_directions_are_bitwise_regenerated_whatever_the_chunking_and_order():
    key = parameter_key(42, 3)
    whole = sign_bits(key, 0, 10_007, "cpu")
    cuts = [0, 1, 31, 32, 33, 1000, 4095, 9999, 10_007]  # boundaries inside and across words
    parts = {a: sign_bits(key, a, b - a, "cpu") for a, b in zip(cuts[:-1], cuts[1:], strict=True)}
    rebuilt = torch.cat([parts[a] for a in reversed(cuts[:-1])][::-1])  # generated in reverse
    assert torch.equal(rebuilt, whole)
    assert torch.equal(direction(key, (97, 103)).flatten(), whole[: 97 * 103].float() * 2 - 1)
    assert not torch.equal(sign_bits(parameter_key(43, 3), 0, 10_007, "cpu"), whole)


def test_directions_are_rademacher_and_uncorrelated_across_parameters_and_seeds():
    # each statistic below is a mean of N independent ±1 products if the streams are
    # independent: sd 1/√N, so 5/√N bounds all of them with P(false alarm) < 1e-4
    bound = 5 / N**0.5
    streams = [direction(parameter_key(seed, j), (N,)) for seed in (0, 1) for j in range(8)]
    for u in streams:
        assert set(u.unique().tolist()) == {-1.0, 1.0}
        assert abs(float(u.mean())) < bound
    stacked = torch.stack(streams).double()
    correlation = (stacked @ stacked.T) / N
    off_diagonal = correlation[~torch.eye(len(streams), dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < bound
    # and neighbouring elements of one stream are uncorrelated too (no lattice in the hash)
    assert abs(float((stacked[:, 1:] * stacked[:, :-1]).mean())) < bound / len(streams) ** 0.5


def test_rademacher_gradient_is_unbiased_with_variance_d_minus_one():
    """ĝ = (uᵀg)u: E ĝ = g, and ‖ĝ − g‖² = (D−2)p² + ‖g‖² with p = uᵀg, so
    E‖ĝ − g‖² = (D−1)‖g‖² (Gaussian u: (D+1)‖g‖²). Var p² ≤ E p⁴ ≤ 3‖g‖⁴ bounds the
    standard error of the sample mean by (D−2)√3‖g‖²/√M."""
    d, m = 4, 20_000
    g = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    u = torch.stack([direction(parameter_key(seed, 0), (d,)) for seed in range(m)]).double()
    p = u @ g
    grads = p[:, None] * u
    se_mean = grads.std(0) / m**0.5
    assert float(((grads.mean(0) - g) / se_mean).abs().max()) < 4.5
    spread = ((grads - g) ** 2).sum(1).mean()
    tolerance = 5 * (d - 2) * 3**0.5 * float(g @ g) / m**0.5
    assert abs(float(spread) - (d - 1) * float(g @ g)) < tolerance
    torch.testing.assert_close((grads**2).sum(1), d * p**2)  # ‖ĝ‖² = D·p²: variance_scale


def test_spsa_variance_scale_is_the_parameter_count(vit_task):
    from fqa.estimators import create_estimator

    d = sum(p.numel() for _, p in vit_task.trainable_parameters())
    assert create_estimator("spsa").variance_scale(vit_task) == float(d)


def test_swapping_per_module_or_for_the_whole_query_gives_identical_losses(vit_task):
    """The per-module swap (hooks) and the whole-query swap use the same θ ± εu bits."""
    from fqa.estimators.spsa import PerturbedModel

    ids = np.arange(8)
    hooked = PerturbedModel(vit_task, set())
    everything = PerturbedModel(vit_task, set(hooked.names.values()))
    for scale in (1e-2, -1e-2):
        a = hooked.query(7, scale, lambda: vit_task.losses(ids))
        b = everything.query(7, scale, lambda: vit_task.losses(ids))
        assert torch.equal(a, b)
    assert not torch.equal(a, vit_task.losses(ids))


def test_parameters_read_outside_a_forward_are_still_perturbed(vit_task):
    """A task that reads a parameter directly (a prompt context) still sees θ ± εu."""
    from fqa.estimators.spsa import PerturbedModel

    head = vit_task.model.head
    weights = []
    model = PerturbedModel(vit_task, set())
    model.query(3, 0.5, lambda: weights.append(head.weight.detach().clone()) or torch.zeros(1))
    index = [n for n, _ in vit_task.trainable_parameters()].index("head.weight")
    expected = head.weight.detach() + 0.5 * direction(
        parameter_key(3, index), head.weight.shape, dtype=head.weight.dtype
    )
    assert torch.equal(weights[-1], expected)
    assert "head" in model.whole
