"""The planner's per-step helpers against direct formulas."""

import numpy as np

from fqa.allocators import Allocation, AllocationRequest
from fqa.estimators import ShardResult
from fqa.step import Planned, variance_estimate


def test_variance_estimate_matches_the_per_datapoint_formula():
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:12]  # unsorted global ids, as a shuffled batch gives them
    counts = rng.integers(1, 5, size=len(ids))
    sample_ids = np.repeat(ids, counts)
    values = rng.normal(size=len(sample_ids))
    cut = len(sample_ids) // 2  # two shards, splitting a datapoint's samples
    results = [
        ShardResult(0, sample_ids[part], values[part], values[part], len(values[part]), 0)
        for part in (slice(0, cut), slice(cut, None))
    ]
    request = AllocationRequest(
        ids=ids, losses=np.zeros(len(ids)), budget=int(counts.sum()), n_min=1, seed=0
    )
    planned = Planned(0, request, Allocation(counts, counts.astype(float)), [], 0.0)
    scale = 3.0
    expected = (
        sum(
            scale * np.sum(values[sample_ids == i] ** 2) / n**2
            for i, n in zip(ids, counts, strict=True)
        )
        / len(ids) ** 2
    )
    assert np.isclose(variance_estimate(planned, results, scale), expected, rtol=1e-12)
