"""The lr estimator's noise streams (fqa.gaussian_noise): the counter kernel against its
specification and N(0, 1), replay from marks, the torch source, and the fallback."""

from __future__ import annotations

import logging
import math
import multiprocessing

import numpy as np
import pytest
import torch
from scipy import stats

from fqa import gaussian_noise
from fqa.gaussian_noise import CounterMark, GaussianStream, cpu_kernel
from fqa.noise import _mix32


def _specified(key: tuple[int, int], word: int, count: int) -> torch.Tensor:
    """The kernel's values as gaussian_noise.c specifies them, in float64 torch ops with
    fqa.noise's hash: Box-Muller on consecutive hashed counter words."""
    pairs = (count + 1) // 2
    words = torch.arange(word, word + 2 * pairs, dtype=torch.int64)
    hashed = _mix32(_mix32(words.bitwise_xor(key[0])).bitwise_xor_(key[1]))
    a, b = (hashed[0::2] >> 8).double(), (hashed[1::2] >> 8).double()
    radius = torch.sqrt(-2 * torch.log((a + 0.5) / 2**24))
    theta = 2 * math.pi * b / 2**24
    return torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], 1).flatten()[:count]


def test_the_cpu_default_is_the_counter_kernel():
    """The speed the benchmark reports needs the kernel: a machine with a C compiler
    (this project's) must build it, not fall back silently."""
    assert cpu_kernel() is not None
    assert isinstance(GaussianStream(5, "cpu").mark(), CounterMark)


def test_counter_values_follow_their_specification():
    """Each value within float32 rounding of the float64 formula: |z| < 6, so log/cos at
    a few ulp and θ rounded to float32 (2π·2⁻²⁴) keep every value within 1e-5; a wrong
    word, pairing or hash would be O(1) off."""
    stream = GaussianStream(17, "cpu")
    key = stream.mark()[:2]
    first = stream.draw((3, 7))  # odd: the next draw starts at word 22
    second = stream.draw((1000,))
    assert stream.mark().word == 22 + 1000
    torch.testing.assert_close(first.flatten().double(), _specified(key, 0, 21), rtol=0, atol=1e-5)
    torch.testing.assert_close(second.double(), _specified(key, 22, 1000), rtol=0, atol=1e-5)


def test_counter_values_are_standard_normal_and_uncorrelated():
    """2M values: KS against N(0, 1), the first four moments within 5 standard errors
    (closed-form variances of the sample moments of a normal), the 3σ tail within 5
    binomial standard errors, neighbours and separate streams uncorrelated (SE 1/√n)."""
    n = 2_000_000
    z = GaussianStream(2026, "cpu").draw((n,)).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    se = {1: 1 / math.sqrt(n), 2: math.sqrt(2 / n), 3: math.sqrt(15 / n), 4: math.sqrt(96 / n)}
    for power, expected in [(1, 0.0), (2, 1.0), (3, 0.0), (4, 3.0)]:
        assert abs(np.mean(z**power) - expected) < 5 * se[power], power
    tail = np.mean(np.abs(z) > 3)
    p = 2 * stats.norm.sf(3)
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n)
    other = GaussianStream(2027, "cpu").draw((n,)).double().numpy()
    for a, b in [(z[0::2], z[1::2]), (z[:-1], z[1:]), (z, other)]:
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(len(a))


@pytest.mark.parametrize("source", ["auto", "torch"])
def test_a_mark_replays_the_same_values(source):
    stream = GaussianStream(3, "cpu", source)
    stream.draw((5,))
    mark = stream.mark()
    later = [stream.draw((3, 11)), stream.draw((64,), torch.float64)]
    replay = GaussianStream.resume(mark, "cpu")
    assert torch.equal(replay.draw((3, 11)), later[0])
    assert torch.equal(replay.draw((64,), torch.float64), later[1])


def test_the_torch_source_is_torch_randn():
    """noise_source: torch draws what releases before the kernel drew."""
    generator = torch.Generator().manual_seed(99)
    expected = torch.randn((4, 9), generator=generator)
    assert torch.equal(GaussianStream(99, "cpu", "torch").draw((4, 9)), expected)


def test_a_bad_source_is_refused_by_name():
    with pytest.raises(ValueError, match=r"noise_source='fast'.*auto.*torch"):
        GaussianStream(1, "cpu", "fast")


def test_a_stream_past_its_counter_is_refused():
    key = GaussianStream(1, "cpu").mark()
    stream = GaussianStream.resume(CounterMark(key.k0, key.k1, 2**32 - 8), "cpu")
    stream.draw((8,))
    with pytest.raises(ValueError, match="shard_rows"):
        stream.draw((1,))


def test_without_a_compiler_the_torch_source_is_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FQA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fqa.gaussian_noise"):
            stream = GaussianStream(99, "cpu")
        assert "torch.randn" in caplog.text and "no-such-compiler" in caplog.text
        assert torch.equal(stream.draw((4, 9)), GaussianStream(99, "cpu", "torch").draw((4, 9)))
    finally:
        cpu_kernel.cache_clear()


def _build_and_draw(cache: str) -> list[float]:
    import os

    os.environ["FQA_CACHE_DIR"] = cache
    gaussian_noise.cpu_kernel.cache_clear()
    return GaussianStream(8, "cpu").draw((16,)).tolist()


def test_processes_building_the_kernel_at_once_share_one_library(tmp_path):
    """Ray workers starting together each build into a private name and rename it into
    place: every one gets the kernel, and the same values."""
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        drawn = pool.map(_build_and_draw, [str(tmp_path)] * 3)
    assert drawn[0] == drawn[1] == drawn[2] == GaussianStream(8, "cpu").draw((16,)).tolist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(list(tmp_path.glob("gaussian_noise-*.so"))) == 1
