"""fqa.exact_sum: the same bits however the terms are split, within the derived bound."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from fqa.exact_sum import exact_sum, layout_of, scale_exponents


class ThreadCollective:
    """An all-reduce among threads (each thread is one 'process' of the sum)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.inputs: list[torch.Tensor | None] = [None] * size

    def member(self, rank: int):
        group = self

        class Member:
            def max(self, tensor):
                return group._reduce(rank, tensor, torch.maximum)

            def sum(self, tensor):
                return group._reduce(rank, tensor, torch.add)

        return Member()

    def _reduce(self, rank, tensor, op):
        self.inputs[rank] = tensor.clone()
        self.barrier.wait()
        total = self.inputs[0]
        for other in self.inputs[1:]:
            total = op(total, other)
        self.barrier.wait()  # everyone has read the inputs before the next call
        return total


def _partials(terms: int, seed: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-6, 2, terms, dtype=torch.float64).to(dtype)  # very different sizes
    return [
        {
            "w": torch.randn(7, 5, generator=generator, dtype=dtype) * scales[t],
            "b": torch.randn(5, generator=generator, dtype=dtype) * 1e-3,
        }
        for t in range(terms)
    ]


def _split_sum(partials, owners, layout, size):
    collective = ThreadCollective(size)
    out: list[dict | None] = [None] * size

    def run(rank):
        mine = [p for p, owner in zip(partials, owners, strict=True) if owner == rank]
        out[rank] = exact_sum(mine, layout, len(partials), collective.member(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return out


def test_the_sum_has_the_same_bits_however_the_terms_are_split_and_ordered():
    partials = _partials(9, seed=0)
    layout = layout_of(partials)
    alone = exact_sum(partials, layout, len(partials))
    reversed_alone = exact_sum(partials[::-1], layout, len(partials))
    generator = torch.Generator().manual_seed(1)
    for size in (2, 3):
        owners = torch.randint(0, size, (len(partials),), generator=generator).tolist()
        for rank_total in _split_sum(partials, owners, layout, size):
            for name in layout:
                assert torch.equal(rank_total[name], alone[name])
    for name in layout:
        assert torch.equal(reversed_alone[name], alone[name])


def test_a_member_with_no_terms_takes_part_and_gets_the_total():
    partials = _partials(4, seed=2)
    layout = layout_of(partials)
    owners = [0, 0, 0, 0]  # rank 1 holds nothing
    totals = _split_sum(partials, owners, layout, 2)
    alone = exact_sum(partials, layout, 4)
    assert all(torch.equal(t["w"], alone["w"]) for t in totals)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_error_is_within_the_derived_bound(dtype):
    """Each term is rounded once to a multiple of 2^-k: |error| <= terms·2^-(k+1), plus
    the conversions of the integer total to float64 and to ``dtype`` (half an ulp each).
    The reference is the correctly rounded sum (math.fsum per element)."""
    partials = _partials(16, seed=3, dtype=dtype)
    layout = layout_of(partials)
    total = exact_sum(partials, layout, len(partials))
    for name in layout:
        stacked = torch.stack([p[name].double().flatten() for p in partials], dim=1)
        exact = torch.tensor([math.fsum(row) for row in stacked.tolist()], dtype=torch.float64)
        exact = exact.view(layout[name][0])
        max_abs = torch.stack([p[name].double().abs().max() for p in partials]).max()
        (k,) = scale_exponents(max_abs.reshape(1), len(partials))
        bound = len(partials) * math.ldexp(1.0, -k - 1) + exact.abs() * torch.finfo(dtype).eps
        assert torch.all((total[name].double() - exact).abs() <= bound)


def test_the_integer_total_cannot_overflow():
    """Worst case: every term at +max in every element still fits below 2^62."""
    terms = 1000
    big = torch.full((3,), 3.0e38, dtype=torch.float32)  # near float32's largest
    total = exact_sum([{"x": big}] * terms, {"x": (big.shape, torch.float64)}, terms)
    assert torch.allclose(total["x"], terms * big.double(), rtol=1e-15, atol=0)


def test_a_non_finite_term_makes_its_tensor_nan_and_leaves_the_others():
    partials = _partials(3, seed=4)
    partials[1]["w"][0, 0] = math.inf
    total = exact_sum(partials, layout_of(partials), 3)
    assert torch.isnan(total["w"]).all()
    assert torch.isfinite(total["b"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consuming_the_terms_gives_the_same_bits_and_leaves_them_untouched_until_taken(dtype):
    """consume=True frees each term as it is encoded (the gradient is not held twice):
    the same total, the dicts emptied; consume=False leaves the caller's tensors as they
    were (float64 terms are not scaled in place)."""
    partials = _partials(4, seed=5, dtype=dtype)
    copies = [{name: t.clone() for name, t in p.items()} for p in partials]
    layout = layout_of(partials)
    kept = exact_sum(partials, layout, len(partials))
    for partial, copy in zip(partials, copies, strict=True):
        assert all(torch.equal(partial[name], copy[name]) for name in copy)
    consumed = exact_sum(partials, layout, len(partials), consume=True)
    assert all(not partial for partial in partials)
    assert all(torch.equal(kept[name], consumed[name]) for name in layout)
