"""Lazily opened Parquet datasets (fqa.lazy_data): same rows as eager loading, a correct
id index, and a cache that never holds more than its cap."""

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fqa.data import SHAPE_KEY, ImageDataset, load_image_dataset, load_splits
from fqa.lazy_data import LazyImageDataset, RowGroupCache, open_lazy
from fqa.trainer import Trainer
from jobs.make_big_parquet import main as make_big_parquet

ROW_GROUP = 16


def _write_array_split(path, ids, seed, row_group=ROW_GROUP):
    """uint8 pixel arrays [n, 2, 5, 3], row groups of ``row_group`` rows, shuffled ids."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(ids), 2 * 5 * 3), dtype=np.uint8)
    table = pa.table(
        {
            "index": pa.array(ids, pa.int64()),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 30),
            "label": pa.array(rng.integers(0, 4, len(ids)), pa.int64()),
            "caption": [f"c{i}" for i in ids],
        }
    ).replace_schema_metadata({SHAPE_KEY: json.dumps([2, 5, 3])})
    pq.write_table(table, path, row_group_size=row_group)


def _write_png_split(path, ids, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in ids:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    table = pa.table(
        {"index": pa.array(ids, pa.int64()), "image": pa.array(blobs, pa.binary()),
         "label": pa.array(rng.integers(0, 3, len(ids)), pa.int64())}
    )  # fmt: skip
    pq.write_table(table, path, row_group_size=ROW_GROUP)


@pytest.fixture
def splits_dir(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(10_000)[:150] * 7 + 3  # sparse, shuffled global ids
    for seed, (split, part) in enumerate(
        zip(("train", "validation", "test"), np.split(ids, [100, 125]), strict=True)
    ):
        _write_array_split(tmp_path / f"{split}.parquet", part, seed)
    return tmp_path


@pytest.mark.parametrize("form", ["array", "png"])
def test_lazy_rows_equal_eager_rows(tmp_path, form):
    ids = np.random.default_rng(1).permutation(500)[:70] + 1000
    path = tmp_path / "train.parquet"
    (_write_array_split if form == "array" else _write_png_split)(path, ids, 0)
    eager = load_image_dataset(path)
    lazy = open_lazy(path, RowGroupCache(2**20))
    assert isinstance(lazy, LazyImageDataset) and len(lazy) == len(eager) == 70
    assert torch.equal(lazy.ids, eager.ids) and torch.equal(lazy.labels, eager.labels)
    assert lazy.image_shape == eager.image_shape
    order = torch.as_tensor(np.random.default_rng(2).permutation(70))
    assert torch.equal(lazy.images_at(order), eager.images[order])
    query = ids[[5, 60, 0, 33]]
    assert torch.equal(lazy.positions(query), eager.positions(query))
    picked = lazy.select(query)
    assert isinstance(picked, ImageDataset)
    assert torch.equal(picked.images, eager.select(query).images)
    with pytest.raises(KeyError, match="ids not in dataset"):
        lazy.positions([-5])


def test_the_index_maps_each_id_to_the_row_written_with_it(tmp_path):
    """Each image is a constant equal to a function of its id: the index must find it."""
    ids = np.random.default_rng(3).permutation(1000)[:90].astype(np.int64)
    pixels = np.repeat((ids % 251).astype(np.uint8)[:, None], 30, axis=1)
    table = pa.table(
        {"index": ids, "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 30),
         "label": np.zeros(90, np.int64)}
    ).replace_schema_metadata({SHAPE_KEY: json.dumps([2, 5, 3])})  # fmt: skip
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    lazy = open_lazy(tmp_path / "x.parquet", RowGroupCache(2**20))
    assert len(lazy.group_starts) == 13  # 90 rows in groups of 7
    query = np.sort(ids)[::-1].copy()
    images = lazy.images_at(lazy.positions(query))
    expected = torch.as_tensor((query % 251).astype(np.float32) / 255)
    assert torch.equal(images.flatten(1).amin(1), expected)
    assert torch.equal(images.flatten(1).amax(1), expected)


def test_the_cache_never_holds_more_than_its_cap(splits_dir):
    group_bytes = ROW_GROUP * 30 * 4  # decoded float32
    cache = RowGroupCache(int(2.5 * group_bytes))  # room for 2 row groups, not 3
    lazy = open_lazy(splits_dir / "train.parquet", cache)
    eager = load_image_dataset(splits_dir / "train.parquet")
    rng = np.random.default_rng(4)
    for _ in range(30):
        rows = torch.as_tensor(rng.choice(len(lazy), 8, replace=False))
        assert torch.equal(lazy.images_at(rows), eager.images[rows])
        assert cache.bytes <= cache.max_bytes
    assert cache.peak_bytes <= cache.max_bytes
    assert cache.misses > 7  # 7 row groups, re-read after eviction
    lazy.images_at(torch.arange(4))
    hits = cache.hits
    lazy.images_at(torch.arange(4))  # the same row group again: served from the cache
    assert cache.hits == hits + 1
    tiny = RowGroupCache(10)  # smaller than one row group: decoded, used, not kept
    lazy = open_lazy(splits_dir / "train.parquet", tiny)
    assert torch.equal(lazy.images_at(torch.arange(20)), eager.images[:20])
    assert tiny.bytes == 0 and len(tiny) == 0


def test_load_splits_chooses_lazy_or_in_memory_and_logs_it(splits_dir, caplog):
    with caplog.at_level(logging.INFO, logger="fqa.data"):
        lazy = load_splits(splits_dir, in_memory_mb=0.005, cache_mb=1)  # train only is larger
    assert isinstance(lazy["train"], LazyImageDataset)
    assert isinstance(lazy["validation"], ImageDataset)
    assert lazy["train"].cache is not None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "opened lazily" in messages and "loaded into memory" in messages
    eager = load_splits(splits_dir)
    for split in eager:
        assert torch.equal(lazy[split].ids, eager[split].ids)
    kept = lazy["train"].filter_labels([1, 3], relabel=True)
    expected = eager["train"].filter_labels([1, 3], relabel=True)
    assert isinstance(kept, LazyImageDataset) and kept.num_classes == 2
    assert torch.equal(kept.labels, expected.labels)
    assert torch.equal(kept.images_at(torch.arange(len(kept))), expected.images)


def test_training_on_lazy_splits_equals_training_in_memory(tiny_config):
    """The task reads lazy splits batch by batch: the very same numbers."""
    eager = Trainer(tiny_config()).fit()
    lazy_trainer = Trainer(
        tiny_config(run={"name": "lazy"}, data={"in_memory_mb": 0, "cache_mb": 0.05})
    )
    assert all(isinstance(ds, LazyImageDataset) for ds in lazy_trainer.task._splits.values())
    lazy = lazy_trainer.fit()
    for key in ("test_loss", "test_accuracy", "val_accuracy", "queries"):
        assert lazy[key] == eager[key], key
    cache = lazy_trainer.task._splits["train"].cache
    assert cache.peak_bytes <= 0.05 * 2**20


def test_make_big_parquet_writes_a_dataset_that_opens_lazily(tmp_path, capsys):
    out = tmp_path / "big"
    assert make_big_parquet(["write", "--out", str(out), "--rows", "300", "--size", "8",
                             "--row-group", "32"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 300 and report["decoded_mb"] == pytest.approx(300 * 192 * 4 / 2**20, abs=0.1)
    splits = load_splits(out, in_memory_mb=0, cache_mb=0.1)
    assert sum(len(s) for s in splits.values()) == 300
    assert pq.ParquetFile(out / "train.parquet").metadata.num_row_groups == 8  # 240 rows / 32
