"""Parquet datasets and the bundled digits: round trip, split, lookups, and every bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fqa.data import (
    DIGIT_NAMES,
    DataError,
    ImageDataset,
    ensure_digits,
    load_image_dataset,
    load_splits,
    prepare_digits,
    write_image_parquet,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    paths = prepare_digits(out, seed=0)
    return out, paths


@pytest.fixture(scope="module")
def splits(prepared):
    return load_splits(prepared[0])


def small(tmp_path, name="small.parquet", n=6, **kw):
    """A tiny valid array-form dataset (labels 0..2, shape [1, 2, 3])."""
    rng = np.random.default_rng(1)
    images = rng.random((n, 1, 2, 3), dtype=np.float32)
    args = dict(
        ids=np.arange(100, 100 + n),
        images=images,
        labels=np.arange(n) % 3,
        captions=[f"c{i}" for i in range(n)],
    )
    args.update(kw)
    return write_image_parquet(tmp_path / name, **args), images


def write_table(path, columns, metadata=None):
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def png_bytes(pixels: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- digits


def test_prepare_writes_files_and_metadata(prepared):
    out, paths = prepared
    assert set(paths) == {"train", "validation", "test"}
    assert all(p.exists() and p.parent == out for p in paths.values())
    assert not list(out.glob("*.tmp"))  # atomic writes leave no tmp files behind
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "digits" and meta["num_classes"] == 10 and meta["seed"] == 0
    assert meta["class_names"][0] == "zero" and meta["class_names"][7] == "seven"
    assert meta["image_shape"] == [1, 8, 8]
    assert sum(meta["splits"].values()) == N_DIGITS
    schema = pq.read_schema(paths["train"])
    assert schema.field("index").type == pa.int64() and schema.field("label").type == pa.int64()
    assert json.loads(schema.metadata[b"fqa.image_shape"]) == [1, 8, 8]


def test_round_trip_matches_sklearn(prepared, splits, digits):
    sizes = json.loads((prepared[0] / "dataset.json").read_text())["splits"]
    for name, ds in splits.items():
        assert len(ds) == sizes[name] > 0, name
        idx = ds.ids.numpy()
        assert ds.images.dtype == torch.float32 and ds.images.shape[1:] == (1, 8, 8)
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), digits.images[idx] / 16)
        np.testing.assert_array_equal(ds.labels.numpy(), digits.target[idx])
        assert float(ds.images.min()) >= 0 and float(ds.images.max()) <= 1
        assert ds.num_classes == 10 and ds.class_names[9] == "nine"
        assert ds.path.name == f"{name}.parquet"


def test_splits_disjoint_and_cover_all(splits):
    ids = [set(ds.ids.tolist()) for ds in splits.values()]
    assert sum(len(s) for s in ids) == N_DIGITS
    assert set().union(*ids) == set(range(N_DIGITS))
    sizes = {k: len(v) for k, v in splits.items()}
    assert abs(sizes["train"] - 0.7 * N_DIGITS) < 10
    assert abs(sizes["validation"] - 0.15 * N_DIGITS) < 10
    assert abs(sizes["test"] - 0.15 * N_DIGITS) < 10


def test_split_is_stratified(splits, digits):
    overall = np.bincount(digits.target, minlength=10) / N_DIGITS
    for ds in splits.values():
        share = np.bincount(ds.labels.numpy(), minlength=10) / len(ds)
        assert np.abs(share - overall).max() < 0.01


def test_split_deterministic_by_seed(prepared, tmp_path):
    out, paths = prepared
    again = prepare_digits(tmp_path / "same", seed=0)
    other = prepare_digits(tmp_path / "other", seed=1)
    for split in paths:
        same_ids = pq.read_table(again[split], columns=["index"]).column("index").to_pylist()
        ref_ids = pq.read_table(paths[split], columns=["index"]).column("index").to_pylist()
        assert same_ids == ref_ids
        assert again[split].read_bytes() == paths[split].read_bytes()
    test_ids = pq.read_table(other["test"], columns=["index"]).column("index").to_pylist()
    assert set(test_ids) != set(
        pq.read_table(paths["test"], columns=["index"]).column("index").to_pylist()
    )


def test_captions_match_labels(splits):
    for ds in splits.values():
        assert len(ds.captions) == len(ds)
        for caption, label in zip(ds.captions, ds.labels.tolist(), strict=True):
            assert caption == f"a photo of the digit {DIGIT_NAMES[label]}"
    assert "a photo of the digit seven" in splits["train"].captions


def test_ensure_digits_prepares_once(tmp_path):
    first = ensure_digits(tmp_path, seed=0)
    mtime = (tmp_path / "train.parquet").stat().st_mtime_ns
    second = ensure_digits(tmp_path, seed=0)
    assert (tmp_path / "train.parquet").stat().st_mtime_ns == mtime  # not rewritten
    assert torch.equal(first["test"].ids, second["test"].ids)
    with pytest.raises(DataError, match="seed 0, not digits with seed 3"):
        ensure_digits(tmp_path, seed=3)


def test_bad_fractions(tmp_path):
    with pytest.raises(ValueError, match="summing to 1"):
        prepare_digits(tmp_path, fractions=(0.5, 0.2, 0.2))


# --------------------------------------------------------------------------- ImageDataset


def test_positions_maps_ids_to_rows(splits):
    ds = splits["validation"]
    ids = ds.ids[[5, 0, 17, 5]]
    assert ds.positions(ids).tolist() == [5, 0, 17, 5]
    assert ds.positions(ds.ids.tolist()).tolist() == list(range(len(ds)))
    unknown = next(iter(set(splits["train"].ids.tolist())))
    with pytest.raises(KeyError, match=str(unknown)):
        ds.positions([int(ds.ids[0]), unknown])


def test_select_and_subset(splits, digits):
    ds = splits["train"]
    picked = ds.select([int(ds.ids[3]), int(ds.ids[1])])
    assert picked.ids.tolist() == [int(ds.ids[3]), int(ds.ids[1])]
    np.testing.assert_array_equal(picked.images[:, 0].numpy(), digits.images[picked.ids] / 16)
    assert picked.captions == [ds.captions[3], ds.captions[1]]
    assert picked.positions([int(ds.ids[1])]).tolist() == [1]
    mask = ds.labels == 4
    sub = ds.subset(mask)
    assert len(sub) == int(mask.sum()) and bool((sub.labels == 4).all())
    with pytest.raises(ValueError, match="mask"):
        ds.subset(torch.ones(3, dtype=torch.bool))


def test_filter_labels(splits):
    ds = splits["train"]
    source = ds.filter_labels([0, 1, 2, 3, 4])
    target = ds.filter_labels(range(5, 10))
    assert set(source.labels.tolist()) == {0, 1, 2, 3, 4}
    assert len(source) + len(target) == len(ds)
    assert not set(source.ids.tolist()) & set(target.ids.tolist())
    assert source.num_classes == 10  # the same head as the full task by default
    relabeled = ds.filter_labels([7, 5, 9], relabel=True)
    assert set(relabeled.labels.tolist()) == {0, 1, 2} and relabeled.num_classes == 3
    assert relabeled.class_names == ["five", "seven", "nine"]
    original = ds.labels[ds.positions(relabeled.ids)]
    assert torch.equal(torch.tensor([5, 7, 9])[relabeled.labels], original)


def test_in_memory_dataset_checks():
    with pytest.raises(ValueError, match="unique"):
        ImageDataset(ids=torch.tensor([1, 1]), images=torch.zeros(2, 1, 2, 2))
    ds = ImageDataset(
        ids=torch.tensor([9, 3]), images=torch.zeros(2, 1, 2, 2), labels=torch.tensor([0, 4])
    )
    assert ds.num_classes == 5 and ds.positions([3]).tolist() == [1]


# --------------------------------------------------------------------------- user datasets


def test_user_array_dataset_round_trip(tmp_path):
    path, images = small(tmp_path)
    ds = load_image_dataset(path, require_caption=True)
    assert ds.ids.tolist() == list(range(100, 106))
    assert torch.equal(ds.images, torch.from_numpy(images))
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3
    assert ds.captions[2] == "c2" and ds.class_names is None


def test_optional_label_and_uint8_list(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 6) * 20
    path = write_table(
        tmp_path / "u8.parquet",
        {
            "index": pa.array([0, 1], pa.int32()),
            "image": pa.array(list(pixels), pa.list_(pa.uint8())),
            "caption": ["a", "b"],
        },
        {"fqa.image_shape": "[1, 2, 3]"},
    )
    ds = load_image_dataset(path, require_label=False, require_caption=True)
    assert ds.labels is None and ds.ids.dtype == torch.int64
    np.testing.assert_allclose(ds.images.numpy().reshape(2, 6), pixels / 255, rtol=1e-6)


def test_png_binary_images(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    path = write_table(
        tmp_path / "png.parquet",
        {
            "index": pa.array([7, 8, 9], pa.int64()),
            "image": [png_bytes(g, "L") for g in gray],
            "label": pa.array([1, 0, 1], pa.int64()),
        },
    )
    ds = load_image_dataset(path)
    assert ds.images.shape == (3, 1, 5, 4)
    np.testing.assert_allclose(ds.images[:, 0].numpy(), gray / 255, rtol=1e-6)

    # Mixed modes and sizes: all converted to RGB at the first image's size.
    rgb = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (10, 8), dtype=np.uint8)
    path = write_table(
        tmp_path / "mixed.parquet",
        {
            "index": pa.array([0, 1, 2], pa.int64()),
            "image": [png_bytes(rgb, "RGB"), png_bytes(gray[0], "L"), png_bytes(big, "L")],
            "label": pa.array([0, 0, 0], pa.int64()),
        },
    )
    ds = load_image_dataset(path)
    assert ds.images.shape == (3, 3, 5, 4)
    np.testing.assert_allclose(ds.images[0].numpy(), rgb.transpose(2, 0, 1) / 255, rtol=1e-6)
    np.testing.assert_allclose(ds.images[1, 2].numpy(), gray[0] / 255, rtol=1e-6)


def test_png_shape_metadata_sets_mode_and_size(tmp_path):
    gray = np.full((4, 6), 51, np.uint8)
    path = write_table(
        tmp_path / "meta.parquet",
        {
            "index": pa.array([0], pa.int64()),
            "image": [png_bytes(gray, "L")],
            "label": pa.array([0], pa.int64()),
        },
        {"fqa.image_shape": "[3, 2, 3]"},
    )
    ds = load_image_dataset(path)
    assert ds.images.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(ds.images.numpy(), 0.2, rtol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as e:
        load_image_dataset(tmp_path / "nope.parquet")
    assert "nope.parquet" in str(e.value) and "fqa data prepare digits --out" in str(e.value)
    with pytest.raises(DataError, match=r"missing split files.*fqa data prepare digits"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="is a directory"):
        load_image_dataset(tmp_path)


def test_not_parquet_and_truncated(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("index,image\n1,2\n")
    with pytest.raises(DataError, match="not a readable Parquet file") as e:
        load_image_dataset(junk)
    assert "junk.parquet" in str(e.value) and "Fix:" in str(e.value)

    path, _ = small(tmp_path)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image_dataset(cut)

    # Intact footer, damaged data pages.
    data = bytearray(path.read_bytes())
    data[4:200] = bytes(196)
    bad = tmp_path / "damaged.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged.parquet.*corrupt or truncated"):
        load_image_dataset(bad)


@pytest.mark.parametrize("column", ["index", "image", "label"])
def test_missing_required_column(tmp_path, column):
    path, _ = small(tmp_path)
    table = pq.read_table(path)
    write_table(
        tmp_path / "m.parquet",
        {c: table.column(c) for c in table.column_names if c != column},
        table.schema.metadata,
    )
    with pytest.raises(DataError, match=f"missing required column '{column}'") as e:
        load_image_dataset(tmp_path / "m.parquet")
    assert f"add a '{column}' column" in str(e.value)


def test_missing_caption_when_required(tmp_path):
    path, _ = small(tmp_path, captions=None)
    assert load_image_dataset(path).captions is None
    with pytest.raises(DataError, match="missing required column 'caption'.*CLIP"):
        load_image_dataset(path, require_caption=True)


@pytest.mark.parametrize(
    "column,values,message",
    [
        ("index", pa.array([1.0, 2.0]), "column 'index' has type double, expected int64"),
        ("label", pa.array(["a", "b"]), "column 'label' has type string, expected int64"),
        ("image", pa.array(["x", "y"]), "column 'image' has type string"),
        ("image", pa.array([[1, 2]] * 2, pa.list_(pa.int32())), "column 'image' has type"),
        ("caption", pa.array([1, 2]), "column 'caption' has type int64, expected string"),
    ],
)
def test_wrong_column_type(tmp_path, column, values, message):
    columns = {
        "index": pa.array([0, 1], pa.int64()),
        "image": pa.array([[0.0] * 4] * 2, pa.list_(pa.float32())),
        "label": pa.array([0, 1], pa.int64()),
        column: values,
    }
    path = write_table(tmp_path / "t.parquet", columns, {"fqa.image_shape": "[1, 2, 2]"})
    with pytest.raises(DataError, match=message):
        load_image_dataset(path)


def test_empty_dataset(tmp_path):
    path, _ = small(tmp_path, n=0)
    with pytest.raises(DataError, match="empty"):
        load_image_dataset(path)


def test_duplicate_indices(tmp_path):
    path, _ = small(tmp_path, ids=[5, 6, 5, 7, 8, 6])
    with pytest.raises(DataError, match=r"2 duplicated values, e.g. \[5, 6\]"):
        load_image_dataset(path)


def test_indices_shared_across_splits(tmp_path):
    for split in ("train", "validation", "test"):
        small(tmp_path, name=f"{split}.parquet")
    with pytest.raises(DataError, match="more than one split"):
        load_splits(tmp_path)


def test_negative_label(tmp_path):
    path, _ = small(tmp_path, labels=[0, 1, -3, 0, 1, 2])
    with pytest.raises(DataError, match="negative label -3 at index 102"):
        load_image_dataset(path)


def test_label_beyond_dataset_json(tmp_path):
    path, _ = small(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"num_classes": 2}))
    with pytest.raises(DataError, match="num_classes=2 from dataset.json"):
        load_image_dataset(path)


def test_inconsistent_image_lengths(tmp_path):
    path = write_table(
        tmp_path / "len.parquet",
        {
            "index": pa.array([0, 1, 2], pa.int64()),
            "image": pa.array([[0.1] * 4, [0.2] * 4, [0.3] * 3], pa.list_(pa.float32())),
            "label": pa.array([0, 1, 0], pa.int64()),
        },
        {"fqa.image_shape": "[1, 2, 2]"},
    )
    with pytest.raises(DataError, match="C\\*H\\*W=4 values.*row 2 has 3"):
        load_image_dataset(path)


def test_missing_or_bad_shape_metadata(tmp_path):
    columns = {
        "index": pa.array([0], pa.int64()),
        "image": pa.array([[0.5] * 4], pa.list_(pa.float32())),
        "label": pa.array([0], pa.int64()),
    }
    path = write_table(tmp_path / "noshape.parquet", columns)
    with pytest.raises(DataError, match="'fqa.image_shape' is missing.*write_image_parquet"):
        load_image_dataset(path)
    path = write_table(tmp_path / "badshape.parquet", columns, {"fqa.image_shape": "[4]"})
    with pytest.raises(DataError, match="not a JSON list of 3 positive ints"):
        load_image_dataset(path)


def test_float_pixels_out_of_range(tmp_path):
    path = write_table(
        tmp_path / "range.parquet",
        {
            "index": pa.array([0], pa.int64()),
            "image": pa.array([[0.0, 255.0, 3.0, 1.0]], pa.list_(pa.float32())),
            "label": pa.array([0], pa.int64()),
        },
        {"fqa.image_shape": "[1, 2, 2]"},
    )
    with pytest.raises(DataError, match=r"in \[0, 1\].*divide 0..255 data by 255"):
        load_image_dataset(path)


def test_undecodable_image_bytes(tmp_path):
    good = png_bytes(np.zeros((2, 2), np.uint8), "L")
    path = write_table(
        tmp_path / "bytes.parquet",
        {
            "index": pa.array([10, 11], pa.int64()),
            "image": [good, b"definitely not a png"],
            "label": pa.array([0, 1], pa.int64()),
        },
    )
    with pytest.raises(DataError, match=r"row 1 \(index 11\) cannot be decoded"):
        load_image_dataset(path)

    # A valid header with truncated pixel data fails only when decoded.
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8), "L")
    path = write_table(
        tmp_path / "cut_png.parquet",
        {
            "index": pa.array([10, 12], pa.int64()),
            "image": [good, big[: len(big) // 2]],
            "label": pa.array([0, 1], pa.int64()),
        },
    )
    with pytest.raises(DataError, match=r"row 1 \(index 12\) cannot be decoded"):
        load_image_dataset(path)


def test_null_values(tmp_path):
    path = write_table(
        tmp_path / "null.parquet",
        {
            "index": pa.array([0, 1], pa.int64()),
            "image": pa.array([[0.5] * 4] * 2, pa.list_(pa.float32())),
            "label": pa.array([0, None], pa.int64()),
        },
        {"fqa.image_shape": "[1, 2, 2]"},
    )
    with pytest.raises(DataError, match="column 'label' has 1 null values"):
        load_image_dataset(path)
