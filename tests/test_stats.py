"""Per-datapoint running statistics: exactness, merge invariance, decay, persistence."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from fqa.stats import DatapointStats, StatsPartial


def _reference(ids: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None):
    """Direct (weighted) count, mean and m2 per id, for comparison."""
    weights = np.ones(len(ids)) if weights is None else weights
    out = {}
    for i in np.unique(ids):
        x, w = values[ids == i], weights[ids == i]
        mean = (w * x).sum() / w.sum()
        out[int(i)] = (w.sum(), mean, (w * (x - mean) ** 2).sum())
    return out


def _samples(rng: np.random.Generator, n: int = 400, max_id: int = 30):
    ids = rng.integers(0, max_id, size=n)
    values = rng.normal(loc=ids * 0.3, scale=1.0 + ids % 4)  # per-id means and spreads
    return ids, values


def _assert_partial_matches(partial: StatsPartial, reference: dict) -> None:
    assert sorted(reference) == partial.ids.tolist()
    ref = np.array([reference[i] for i in partial.ids.tolist()])
    np.testing.assert_allclose(partial.count, ref[:, 0], rtol=1e-12)
    np.testing.assert_allclose(partial.mean, ref[:, 1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(partial.m2, ref[:, 2], rtol=1e-10, atol=1e-12)


def test_from_samples_matches_direct_computation():
    ids, values = _samples(np.random.default_rng(0))
    partial = StatsPartial.from_samples(ids, values)
    assert partial.ids.dtype == np.int64
    _assert_partial_matches(partial, _reference(ids, values))


def test_merge_order_and_grouping_do_not_matter():
    rng = np.random.default_rng(1)
    ids, values = _samples(rng)
    whole = StatsPartial.from_samples(ids, values)
    for _ in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=6, replace=False))
        chunks = [
            StatsPartial.from_samples(i, v)
            for i, v in zip(np.split(ids, cuts), np.split(values, cuts), strict=True)
        ]
        # left fold in a random order
        order = rng.permutation(len(chunks))
        folded = StatsPartial.empty()
        for k in order:
            folded = folded.merge(chunks[k])
        # tree reduction: pairs of pairs
        tree = chunks
        while len(tree) > 1:
            tree = [
                tree[j].merge(tree[j + 1]) if j + 1 < len(tree) else tree[j]
                for j in range(0, len(tree), 2)
            ]
        # the central owner merging shards one by one
        owner = DatapointStats()
        for k in rng.permutation(len(chunks)):
            owner.merge(chunks[k])
        for result in (folded, tree[0], owner.to_partial()):
            np.testing.assert_array_equal(result.ids, whole.ids)
            np.testing.assert_allclose(result.count, whole.count, rtol=1e-12)
            np.testing.assert_allclose(result.mean, whole.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(result.m2, whole.m2, rtol=1e-9, atol=1e-12)


def test_running_updates_equal_one_update():
    rng = np.random.default_rng(2)
    ids, values = _samples(rng)
    stats = DatapointStats()
    for chunk in np.array_split(np.arange(len(ids)), 9):
        stats.update(ids[chunk], values[chunk])
    ref = _reference(ids, values)
    query = np.array([*ref, 999, 5000])  # two never-seen ids, one beyond storage
    count, mean, second = stats.lookup(query)
    expected = np.array([ref[i] for i in ref])
    np.testing.assert_allclose(count[:-2], expected[:, 0])
    np.testing.assert_allclose(mean[:-2], expected[:, 1], rtol=1e-9)
    np.testing.assert_allclose(
        second[:-2], expected[:, 2] / expected[:, 0] + expected[:, 1] ** 2, rtol=1e-9
    )
    # second moment = plain mean of y² (what allocators use as v̂)
    for i in list(ref)[:5]:
        assert second[list(ref).index(i)] == pytest.approx(np.mean(values[ids == i] ** 2), rel=1e-9)
    assert count[-2:].tolist() == [0.0, 0.0]
    assert np.isnan(mean[-2:]).all() and np.isnan(second[-2:]).all()
    assert stats.num_observed == len(stats) == len(ref)


def test_decay_is_exponential_forgetting_per_visit():
    rng = np.random.default_rng(3)
    decay = 0.7
    stats = DatapointStats(decay=decay)
    visits = [rng.normal(size=rng.integers(1, 5)) for _ in range(6)]
    for x in visits:
        stats.update(np.zeros(len(x), dtype=np.int64), x)
    # visit t (0-based) of T is weighted decay^(T-1-t)
    values = np.concatenate(visits)
    weights = np.concatenate(
        [np.full(len(x), decay ** (len(visits) - 1 - t)) for t, x in enumerate(visits)]
    )
    w_count, w_mean, w_m2 = _reference(np.zeros(len(values), dtype=int), values, weights)[0]
    count, mean, second = stats.lookup([0])
    assert count[0] == pytest.approx(w_count)
    assert mean[0] == pytest.approx(w_mean)
    assert second[0] == pytest.approx(w_m2 / w_count + w_mean**2)
    # the hand-worked case: [1, 2] then [3] with decay 0.5
    small = DatapointStats(decay=0.5)
    small.update([4, 4], [1.0, 2.0])
    small.update([4], [3.0])
    p = small.to_partial()
    assert (p.count[0], p.mean[0], p.m2[0]) == pytest.approx((2.0, 2.25, 1.375))


def test_decay_one_is_exact_and_decay_leaves_single_visit_alone():
    ids, values = _samples(np.random.default_rng(4))
    a, b = DatapointStats(decay=1.0), DatapointStats(decay=0.3)
    a.update(ids, values)
    b.update(ids, values)  # one visit: nothing to forget yet
    for x, y in zip(a.lookup(np.arange(30)), b.lookup(np.arange(30)), strict=True):
        np.testing.assert_allclose(x, y)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, float("nan")])
def test_bad_decay_is_rejected(decay):
    with pytest.raises(ValueError, match="decay"):
        DatapointStats(decay=decay)


def test_bad_input_is_rejected():
    stats = DatapointStats()
    with pytest.raises(ValueError, match="non-negative"):
        stats.update([3, -1], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        stats.lookup([-2])
    with pytest.raises(ValueError, match="values for"):
        StatsPartial.from_samples([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        StatsPartial.from_samples([1, 2], [1.0, np.nan])
    with pytest.raises(ValueError, match="integers"):
        StatsPartial.from_samples([1.5], [1.0])
    assert stats.num_observed == 0  # failed updates leave no trace


def test_storage_grows_on_demand():
    stats = DatapointStats()
    stats.update([5], [2.0])
    stats.update([3_000_000], [4.0])
    count, mean, second = stats.lookup([5, 3_000_000, 17])
    assert count.tolist() == [1.0, 1.0, 0.0]
    assert second[:2].tolist() == [4.0, 16.0]


def test_table_round_trip():
    ids, values = _samples(np.random.default_rng(5))
    stats = DatapointStats(decay=0.9)
    stats.update(ids, values)
    stats.update(ids[:50], values[:50])
    table = stats.to_table()
    assert table.column_names == ["index", "count", "mean", "m2"]
    assert [str(t) for t in table.schema.types] == ["int64", "double", "double", "double"]
    assert table.num_rows == stats.num_observed
    back = DatapointStats.from_table(table, decay=0.9)
    assert back.decay == 0.9
    for x, y in zip(stats.lookup(np.arange(40)), back.lookup(np.arange(40)), strict=True):
        np.testing.assert_array_equal(x, y)
    # continuing after a restore behaves as if never interrupted
    stats.update(ids[:20], values[:20])
    back.update(ids[:20], values[:20])
    np.testing.assert_array_equal(stats.lookup(np.arange(40))[2], back.lookup(np.arange(40))[2])


def test_parquet_save_load(tmp_path):
    ids, values = _samples(np.random.default_rng(6))
    stats = DatapointStats()
    stats.update(ids, values)
    path = tmp_path / "stats.parquet"
    stats.save(path)
    assert sorted(os.listdir(tmp_path)) == ["stats.parquet"]  # no .tmp left behind
    stats.update([0], [100.0])
    stats.save(path)  # overwrite in place
    back = DatapointStats.load(path, decay=1.0)
    for x, y in zip(stats.lookup(np.arange(40)), back.lookup(np.arange(40)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_malformed_table_names_the_column():
    table = DatapointStats().to_table().drop(["m2"])
    with pytest.raises(ValueError, match="'m2'"):
        DatapointStats.from_table(table)
    dup = pa.table({"index": [1, 1], "count": [1.0, 1.0], "mean": [0.0, 0.0], "m2": [0.0, 0.0]})
    with pytest.raises(ValueError, match="index"):
        DatapointStats.from_table(dup)
