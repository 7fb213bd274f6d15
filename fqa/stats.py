"""Per-datapoint running statistics of a scalar sample y, keyed by global datapoint index.

The estimator reports one scalar per sample (SPSA: the projected derivative p; LR: the
loss minus its baseline). Allocators use the second moment E[y²] = m2/count + mean² as a
scale-free proxy of the per-datapoint variance v_i (docs/METHOD.md §4).

Statistics are mergeable (count, mean, m2; Chan et al.'s parallel update): workers build
a ``StatsPartial`` per shard, the owner merges them, and merging partials in any order or
grouping gives the same result as one update with all samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TABLE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("count", pa.float64()),
        ("mean", pa.float64()),
        ("m2", pa.float64()),
    ]
)


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"datapoint ids must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"datapoint ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"datapoint ids must be non-negative, got {int(arr.min())}")
    return arr


def _chan_combine(
    count_a: np.ndarray,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    count_b: np.ndarray,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel combine of two (count, mean, m2) summaries, elementwise."""
    count = count_a + count_b
    safe = np.where(count > 0, count, 1.0)
    # An empty side has mean NaN by convention; zero it so it cannot poison the result.
    mean_a = np.where(count_a > 0, mean_a, 0.0)
    mean_b = np.where(count_b > 0, mean_b, 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


@dataclass(frozen=True)
class StatsPartial:
    """Statistics of a set of samples: one row per unique id (sorted), mergeable."""

    ids: np.ndarray  # int64 [K], unique and sorted
    count: np.ndarray  # float64 [K], > 0
    mean: np.ndarray  # float64 [K]
    m2: np.ndarray  # float64 [K]: sum of squared deviations from the mean

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("count", "mean", "m2"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"StatsPartial.{name} has {len(getattr(self, name))} rows, ids {n}"
                )

    @classmethod
    def empty(cls) -> StatsPartial:
        z = np.zeros(0)
        return cls(np.zeros(0, dtype=np.int64), z, z.copy(), z.copy())

    @classmethod
    def from_samples(
        cls, ids: np.ndarray | list[int], values: np.ndarray | list[float]
    ) -> StatsPartial:
        """Group samples by id (ids may repeat) and summarise each group."""
        ids = _as_ids(ids)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != ids.shape:
            raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {len(ids)} ids")
        bad = ~np.isfinite(values)
        if bad.any():
            # A NaN would poison the datapoint's statistics for good; the caller decides.
            raise ValueError(
                f"{int(bad.sum())} non-finite sample values (e.g. for datapoint "
                f"{int(ids[bad][0])}); drop or fix them before updating the statistics"
            )
        uniq, inv = np.unique(ids, return_inverse=True)
        k = len(uniq)
        count = np.bincount(inv, minlength=k).astype(np.float64)
        mean = np.bincount(inv, weights=values, minlength=k) / np.maximum(count, 1.0)
        dev = values - mean[inv]  # two-pass: exact m2 without cancellation
        m2 = np.bincount(inv, weights=dev * dev, minlength=k)
        return cls(uniq.astype(np.int64), count, mean, m2)

    def merge(self, other: StatsPartial) -> StatsPartial:
        """The statistics of the union of both sample sets."""
        ids = np.union1d(self.ids, other.ids).astype(np.int64)
        cols = []
        for part in (self, other):
            pos = np.searchsorted(ids, part.ids)
            c, m, s = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids))
            c[pos], m[pos], s[pos] = part.count, part.mean, part.m2
            cols.append((c, m, s))
        count, mean, m2 = _chan_combine(*cols[0], *cols[1])
        return StatsPartial(ids, count, mean, m2)

    def __len__(self) -> int:
        return len(self.ids)


class DatapointStats:
    """Running (count, mean, m2) per global datapoint index, in arrays grown on demand.

    ``decay`` in (0, 1] forgets old visits: before new data for an id is merged, its
    existing count and m2 are multiplied by ``decay`` (the mean is kept), so each visit
    weighs ``decay`` times less than the next one. ``decay=1`` gives exact running stats.
    """

    def __init__(self, decay: float = 1.0) -> None:
        decay = float(decay)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1] (1 = exact running statistics)")
        self.decay = decay
        self._count = np.zeros(0)
        self._mean = np.zeros(0)
        self._m2 = np.zeros(0)

    # -- storage ----------------------------------------------------------------------
    def _reserve(self, max_id: int) -> None:
        size = len(self._count)
        if max_id < size:
            return
        new = max(max_id + 1, 2 * size, 1024)  # doubling keeps growth amortised O(1)
        for name in ("_count", "_mean", "_m2"):
            old = getattr(self, name)
            grown = np.zeros(new)
            grown[:size] = old
            setattr(self, name, grown)

    @property
    def num_observed(self) -> int:
        return int(np.count_nonzero(self._count > 0))

    def __len__(self) -> int:
        return self.num_observed

    # -- updates ----------------------------------------------------------------------
    def merge(self, partial: StatsPartial) -> None:
        keep = partial.count > 0
        ids = partial.ids[keep]
        if ids.size == 0:
            return
        if ids.size > 1 and not (np.diff(ids) > 0).all():  # sorted and unique, in O(n)
            raise ValueError(
                "StatsPartial ids must be unique and sorted; build it with from_samples()"
            )
        self._reserve(int(ids.max()))
        count_a = self._count[ids] * self.decay
        m2_a = self._m2[ids] * self.decay
        count, mean, m2 = _chan_combine(
            count_a,
            self._mean[ids],
            m2_a,
            partial.count[keep],
            partial.mean[keep],
            partial.m2[keep],
        )
        self._count[ids], self._mean[ids], self._m2[ids] = count, mean, m2

    def update(self, ids: np.ndarray | list[int], values: np.ndarray | list[float]) -> None:
        self.merge(StatsPartial.from_samples(ids, values))

    # -- queries ----------------------------------------------------------------------
    def lookup(self, ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, mean, second moment E[y²]) aligned to ids; mean and moment NaN if unseen."""
        ids = _as_ids(ids)
        count = np.zeros(len(ids))
        mean = np.full(len(ids), np.nan)
        m2 = np.zeros(len(ids))
        inside = ids < len(self._count)
        count[inside] = self._count[ids[inside]]
        seen = count > 0
        mean[seen] = self._mean[ids[seen]]
        m2[seen] = self._m2[ids[seen]]
        second = np.full(len(ids), np.nan)
        second[seen] = m2[seen] / count[seen] + mean[seen] ** 2
        return count, mean, second

    def to_partial(self) -> StatsPartial:
        """All observed rows as a partial (e.g. to merge two owners' statistics)."""
        ids = np.flatnonzero(self._count > 0).astype(np.int64)
        return StatsPartial(
            ids, self._count[ids].copy(), self._mean[ids].copy(), self._m2[ids].copy()
        )

    # -- persistence ------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        p = self.to_partial()
        return pa.Table.from_arrays(
            [pa.array(p.ids), pa.array(p.count), pa.array(p.mean), pa.array(p.m2)],
            schema=TABLE_SCHEMA,
        )

    @classmethod
    def from_table(cls, table: pa.Table, decay: float = 1.0) -> DatapointStats:
        for column in TABLE_SCHEMA.names:
            if column not in table.column_names:
                raise ValueError(
                    f"statistics table lacks column {column!r}; expected columns "
                    f"{TABLE_SCHEMA.names}, got {table.column_names}"
                )
        cols = {
            name: table.column(name).to_numpy(zero_copy_only=False) for name in TABLE_SCHEMA.names
        }
        ids = _as_ids(cols["index"])
        if np.unique(ids).size != ids.size:
            raise ValueError("statistics table has repeated values in column 'index'")
        count = cols["count"].astype(np.float64)
        if (count < 0).any() or not np.isfinite(count).all():
            raise ValueError("statistics table column 'count' must be finite and >= 0")
        stats = cls(decay)
        keep = count > 0
        if keep.any():
            stats._reserve(int(ids[keep].max()))
            stats._count[ids[keep]] = count[keep]
            stats._mean[ids[keep]] = cols["mean"].astype(np.float64)[keep]
            stats._m2[ids[keep]] = cols["m2"].astype(np.float64)[keep]
        return stats

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write Parquet atomically: a crash mid-write never leaves a torn file at ``path``."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        pq.write_table(self.to_table(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], decay: float = 1.0) -> DatapointStats:
        return cls.from_table(pq.read_table(os.fspath(path)), decay)
