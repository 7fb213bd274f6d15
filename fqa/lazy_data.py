"""A Parquet image dataset opened lazily: rows are read on demand, not held in memory.

Opening reads only the file's metadata and its small columns (``index``, ``label``,
``caption``), from which the index global id -> (row group, row in the file) is built
once. ``images_at(rows)`` then reads and decodes just the row groups holding those rows,
through a ``RowGroupCache`` bounded in bytes (``data.cache_mb``), so a worker's memory
stays bounded by the cache, whatever the dataset's size. A worker touches only the
row groups its shards, pre-passes and evaluations need.

``fqa.data.load_splits`` chooses between this and eager loading per split, by the
decoded size against ``data.in_memory_mb``, and logs the choice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fqa.data import (
    ImageDataset,
    _array_images,
    _binary_images,
    _fail,
    _read_sidecar,
    check_schema,
    ids_and_labels,
)
from fqa.storage import Remote, arrow_source

log = logging.getLogger(__name__)


class RowGroupCache:
    """Decoded row groups, least recently used evicted first, total bytes <= max_bytes.

    A row group larger than the whole cache is decoded, used, and not kept."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache size must be positive, got {max_bytes} bytes (data.cache_mb)")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # evaluation and shards may share it across threads
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = load()
        with self._lock:
            if value.nbytes <= self.max_bytes and key not in self._items:
                while self.bytes + value.nbytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.nbytes
                self._items[key] = value
                self.bytes += value.nbytes
                self.peak_bytes = max(self.peak_bytes, self.bytes)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, eq=False)
class LazyImageDataset:
    """The interface of ``ImageDataset`` (ids, labels, captions, positions, select,
    filter_labels) with ``images_at(rows)`` in place of an in-memory ``images`` tensor."""

    ids: torch.Tensor  # int64 [n]
    file_rows: np.ndarray  # int64 [n]: each datapoint's row in the file
    source: Path | Remote
    shape: tuple[int, int, int]
    binary: bool  # encoded PNG/JPEG bytes (else pixel arrays)
    group_starts: np.ndarray  # first file row of each row group
    cache: RowGroupCache
    labels: torch.Tensor | None = None
    captions: list[str] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    _sorted_ids: torch.Tensor = field(init=False, repr=False)
    _sorted_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sorted_ids, rows = torch.sort(self.ids)
        object.__setattr__(self, "_sorted_ids", sorted_ids)
        object.__setattr__(self, "_sorted_rows", rows)
        if self.num_classes is None and self.labels is not None:
            num = int(self.labels.max()) + 1 if len(self.labels) else 0
            object.__setattr__(self, "num_classes", num)

    @property
    def path(self) -> Path | Remote:
        return self.source

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def __len__(self) -> int:
        return len(self.ids)

    # same lookups as the in-memory dataset (global id -> row of this dataset)
    positions = ImageDataset.positions
    filter_labels = ImageDataset.filter_labels

    def subset(self, mask: Sequence[bool] | np.ndarray | torch.Tensor) -> LazyImageDataset:
        mask = torch.as_tensor(np.asarray(mask, dtype=bool))
        if mask.shape != (len(self),):
            raise ValueError(f"mask must be bool [{len(self)}], got {tuple(mask.shape)}")
        rows = torch.nonzero(mask).reshape(-1)
        captions = [self.captions[i] for i in rows.tolist()] if self.captions is not None else None
        return replace(
            self,
            ids=self.ids[rows],
            file_rows=self.file_rows[rows.numpy()],
            labels=None if self.labels is None else self.labels[rows],
            captions=captions,
        )

    def select(self, ids) -> ImageDataset:
        """The datapoints with these ids, read into memory (in the order given)."""
        rows = self.positions(ids)
        return ImageDataset(
            ids=self.ids[rows],
            images=self.images_at(rows),
            labels=None if self.labels is None else self.labels[rows],
            captions=None if self.captions is None else [self.captions[i] for i in rows.tolist()],
            path=None,
            num_classes=self.num_classes,
            class_names=self.class_names,
        )

    def images_at(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 [k, C, H, W] for dataset rows (not ids), reading only their row groups."""
        file_rows = self.file_rows[np.asarray(rows, dtype=np.int64).reshape(-1)]
        groups = np.searchsorted(self.group_starts, file_rows, side="right") - 1
        out = np.empty((len(file_rows), *self.shape), dtype=np.float32)
        for group in np.unique(groups):
            where = groups == group
            pixels = self.cache.get((str(self.source), int(group)), lambda g=group: self._decode(g))
            out[where] = pixels[file_rows[where] - self.group_starts[group]]
        return torch.from_numpy(out)

    def _decode(self, group: int) -> np.ndarray:
        table = _parquet_file(self.source).read_row_group(int(group), columns=["image"])
        col = table.column("image")
        if col.null_count:
            raise _fail(
                self.source, f"row group {group} has null images", "give every row an image"
            )
        if self.binary:
            first = int(self.group_starts[group])
            ids = np.arange(first, first + len(col))  # file rows name the images in errors
            return _binary_images(self.source, col, ids, list(self.shape))
        return _array_images(self.source, col, list(self.shape))


def _parquet_file(source: Path | Remote) -> pq.ParquetFile:
    path, filesystem = arrow_source(source)
    handle = filesystem.open_input_file(path) if filesystem is not None else path
    return pq.ParquetFile(handle)


def decoded_bytes(source: Path | Remote, require_caption: bool, require_label: bool) -> int:
    """Bytes the split's images take decoded as float32 (from metadata; one image is
    read when encoded images carry no shape metadata)."""
    file = _parquet_file(source)
    _, shape = check_schema(source, file.schema_arrow, require_caption, require_label)
    if shape is None:
        shape = _probe_shape(source, file)
    return file.metadata.num_rows * int(np.prod(shape)) * 4


def _probe_shape(source: Path | Remote, file: pq.ParquetFile) -> list[int]:
    """Encoded images without metadata: the first image's mode and size set the shape."""
    first = file.read_row_group(0, columns=["image"]).column("image").slice(0, 1)
    return list(_binary_images(source, first, np.array([0]), None).shape[1:])


def open_lazy(
    source: Path | Remote,
    cache: RowGroupCache,
    require_caption: bool = False,
    require_label: bool = True,
) -> LazyImageDataset:
    """Validate a split's schema and small columns and build its index; no images read."""
    file = _parquet_file(source)
    binary, shape = check_schema(source, file.schema_arrow, require_caption, require_label)
    if shape is None:
        shape = _probe_shape(source, file)
    meta = file.metadata
    if meta.num_rows == 0:
        raise _fail(source, "dataset is empty (0 rows)", "write at least one datapoint")
    small = [c for c in ("index", "label", "caption") if c in file.schema_arrow.names]
    try:
        table = file.read(columns=small)
    except (pa.ArrowException, OSError) as e:
        raise _fail(
            source, f"cannot read its data, perhaps corrupt or truncated ({e})", "rewrite the file"
        ) from e
    ids, labels = ids_and_labels(source, table)
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else None
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    sidecar = _read_sidecar(source)
    num_classes = sidecar.get("num_classes")
    if labels is not None and num_classes is not None and labels.max() >= num_classes:
        raise _fail(
            source,
            f"label {labels.max()} is >= num_classes={num_classes} from dataset.json",
            "fix the labels or num_classes in dataset.json",
        )
    return LazyImageDataset(
        ids=torch.from_numpy(ids),
        file_rows=np.arange(len(ids), dtype=np.int64),
        source=source,
        shape=tuple(shape),
        binary=binary,
        group_starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
        cache=cache,
        labels=None if labels is None else torch.from_numpy(labels),
        captions=captions,
        num_classes=num_classes,
        class_names=sidecar.get("class_names"),
    )
