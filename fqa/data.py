"""Image datasets stored as Parquet, and the bundled digits data.

Parquet schema for your own image datasets
------------------------------------------
One row per datapoint. Columns other than these are ignored.

``index``   int64, required, unique. The datapoint's stable global id: the allocator's
            per-datapoint statistics are keyed by it, so it must never change between runs
            and must be unique across the train/validation/test files of one dataset.
``image``   required, one of two forms:

            * ``binary``: encoded PNG/JPEG bytes, decoded with Pillow. All images are
              converted to one mode (``L`` if every image is grayscale, else ``RGB``;
              alpha is dropped) and resized to one size (the first image's, or the
              ``fqa.image_shape`` metadata below when present). 8-bit images only.
            * ``list`` / ``fixed_size_list`` of float (or uint8): the pixels flattened
              row-major as C×H×W. The shape is stored as JSON ``[C, H, W]`` in the Parquet
              schema metadata under the key ``fqa.image_shape``; every row has C·H·W values.

            Float pixels must lie in [0, 1]; uint8 pixels (and decoded bytes) are divided
            by 255. Images load as float32 tensors [n, C, H, W].
``label``   int64 class id >= 0. Required for classification (``require_label=True``).
``caption`` string, optional; required by CLIP tasks (``require_caption=True``).

A ``dataset.json`` beside the file, if present, supplies ``num_classes`` and
``class_names``. ``write_image_parquet`` writes the array form with its metadata;
``prepare_digits`` uses it for scikit-learn's digits (shape [1, 8, 8]).

Every problem with a file is reported as one ``DataError`` (a ``ValueError``) that names
the file, what is wrong, and how to fix it, before any tensors are built.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fqa.storage import Remote, arrow_source, location, scratch_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SHAPE_KEY = b"fqa.image_shape"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PREPARE_HINT = "prepare the bundled digits with `fqa data prepare digits --out DIR`"


class DataError(ValueError):
    """A dataset file is missing or malformed; the message says what to fix."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    ids: torch.Tensor  # int64 [n]: global datapoint indices, unique
    images: torch.Tensor  # float32 [n, C, H, W] in [0, 1]
    labels: torch.Tensor | None = None  # int64 [n], or None for caption-only data
    captions: list[str] | None = None
    path: Path | Remote | None = None  # the file it was loaded from (kept by select/subset)
    num_classes: int | None = None  # None: max label + 1
    class_names: list[str] | None = None
    # Sorted ids and their rows, for vectorised id -> row lookups.
    _sorted_ids: torch.Tensor = field(init=False, repr=False)
    _sorted_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.ids.dtype != torch.int64 or self.ids.ndim != 1:
            raise ValueError(f"ids must be an int64 vector, got {self.ids.dtype} {self.ids.shape}")
        if self.images.ndim != 4 or len(self.images) != n:
            raise ValueError(f"images must be [n={n}, C, H, W], got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels must be [n={n}], got {tuple(self.labels.shape)}")
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"captions must have n={n} entries, got {len(self.captions)}")
        sorted_ids, rows = torch.sort(self.ids)
        if n > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise ValueError("ids must be unique")
        object.__setattr__(self, "_sorted_ids", sorted_ids)
        object.__setattr__(self, "_sorted_rows", rows)
        if self.num_classes is None and self.labels is not None:
            num = int(self.labels.max()) + 1 if n else 0
            object.__setattr__(self, "num_classes", num)
        if self.labels is not None and n and int(self.labels.max()) >= self.num_classes:
            raise ValueError(
                f"label {int(self.labels.max())} is out of range for num_classes={self.num_classes}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def positions(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows holding the given global ids (same order); KeyError naming unknown ids."""
        query = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(-1)
        if len(self) == 0:
            where = torch.zeros_like(query)
            found = torch.zeros_like(query, dtype=torch.bool)
        else:
            where = torch.searchsorted(self._sorted_ids, query).clamp_(max=len(self) - 1)
            found = self._sorted_ids[where] == query
        if not bool(found.all()):
            missing = query[~found][:5].tolist()
            raise KeyError(f"ids not in dataset {self.path or '(in memory)'}: {missing}")
        return self._sorted_rows[where]

    def select(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The datapoints with these global ids, in the order given."""
        return self._take(self.positions(ids))

    def subset(self, mask: Sequence[bool] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The rows where a boolean mask [n] is true."""
        mask = torch.as_tensor(np.asarray(mask, dtype=bool))
        if mask.shape != (len(self),):
            raise ValueError(f"mask must be bool [{len(self)}], got {tuple(mask.shape)}")
        return self._take(torch.nonzero(mask).reshape(-1))

    def filter_labels(self, labels: Iterable[int], relabel: bool = False) -> ImageDataset:
        """Keep the given classes, e.g. [0..4] for a disjoint source task.

        ``relabel=True`` maps the kept classes, in ascending order, to 0..k-1 (and sets
        ``num_classes=k``), so a model head for the subset has exactly k outputs.
        """
        if self.labels is None:
            raise ValueError(f"dataset {self.path or '(in memory)'} has no labels to filter")
        keep = torch.tensor(sorted(set(int(c) for c in labels)), dtype=torch.int64)
        where = self.path or "(in memory)"
        known = self.num_classes or 0
        unknown = [c for c in keep.tolist() if not 0 <= c < known]
        if not len(keep) or unknown:
            raise DataError(
                f"{where}: classes {unknown or '[]'} requested (data.classes) but its labels "
                f"are 0..{known - 1}. Fix: list at least one class in that range"
            )
        out = self.subset(torch.isin(self.labels, keep))
        if not len(out):
            raise DataError(
                f"{where}: no datapoint has one of the classes {keep.tolist()} (data.classes). "
                "Fix: choose classes that occur in the dataset"
            )
        if not relabel:
            return out
        names = [self.class_names[c] for c in keep.tolist()] if self.class_names else None
        new_labels = torch.searchsorted(keep, out.labels)
        return replace(out, labels=new_labels, num_classes=len(keep), class_names=names)

    def _take(self, rows: torch.Tensor) -> ImageDataset:
        captions = [self.captions[i] for i in rows.tolist()] if self.captions is not None else None
        return replace(
            self,
            ids=self.ids[rows],
            images=self.images[rows],
            labels=None if self.labels is None else self.labels[rows],
            captions=captions,
        )


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via a unique tmp file then os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; datasets are shared between users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_image_parquet(
    path: str | Path,
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write a dataset in the array form: float32 pixels [n, C, H, W] in [0, 1]."""
    path = Path(path)
    images = np.asarray(images, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if images.ndim != 4 or len(images) != n:
        raise ValueError(f"images must be [n={n}, C, H, W], got {images.shape}")
    if n and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise ValueError("image pixels must be finite and in [0, 1]; divide uint8 data by 255")
    flat = pa.array(images.reshape(-1))
    columns = {
        "index": pa.array(ids),
        "image": pa.FixedSizeListArray.from_arrays(flat, int(np.prod(images.shape[1:]))),
    }
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    if captions is not None:
        columns["caption"] = pa.array(list(captions), type=pa.string())
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} rows, expected {n}")
    table = pa.table(columns).replace_schema_metadata(
        {SHAPE_KEY: json.dumps(list(images.shape[1:]))}
    )
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


# --------------------------------------------------------------------------- reading


def _fail(path: Path | Remote, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: {problem}. Fix: {fix}.")


def _is_float_or_uint8(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_uint8(t)


def _int_column(path: Path, table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise _fail(
            path,
            f"column {name!r} has type {col.type}, expected int64",
            f"store {name!r} as integers (e.g. pa.int64())",
        )
    if col.null_count:
        raise _fail(
            path, f"column {name!r} has {col.null_count} null values", f"give every row a {name}"
        )
    values = col.to_numpy()
    if values.dtype == np.uint64 and len(values) and values.max() > np.iinfo(np.int64).max:
        raise _fail(path, f"column {name!r} has values above int64's range", "use int64 values")
    return values.astype(np.int64)


def _shape_from_metadata(path: Path, schema: pa.Schema, required: bool) -> list[int] | None:
    raw = (schema.metadata or {}).get(SHAPE_KEY)
    fix = 'set schema metadata {"fqa.image_shape": "[C, H, W]"} or use write_image_parquet'
    if raw is None:
        if required:
            raise _fail(
                path,
                "image arrays need the image shape, but schema metadata key "
                "'fqa.image_shape' is missing",
                fix,
            )
        return None
    try:
        shape = json.loads(raw)
    except ValueError:
        shape = None
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise _fail(
            path,
            f"metadata 'fqa.image_shape' is {raw.decode(errors='replace')!r}, "
            "not a JSON list of 3 positive ints",
            fix,
        )
    return shape


def _array_images(path: Path, col: pa.ChunkedArray, shape: list[int]) -> np.ndarray:
    arr = col.combine_chunks()
    size = int(np.prod(shape))
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != size)
    if len(bad):
        raise _fail(
            path,
            f"image arrays must all have C*H*W={size} values (fqa.image_shape="
            f"{shape}), but row {bad[0]} has {lengths[bad[0]]} "
            f"({len(bad)} rows differ)",
            "write every image flattened at one shape",
        )
    values = arr.flatten()
    if values.null_count:
        raise _fail(path, "image arrays contain null pixels", "fill missing pixels")
    pixels = values.to_numpy(zero_copy_only=False)
    if pixels.dtype == np.uint8:
        return (pixels.astype(np.float32) / 255).reshape(-1, *shape)
    pixels = pixels.astype(np.float32)
    if len(pixels) and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise _fail(
            path,
            f"float pixels must be finite and in [0, 1], found range "
            f"[{np.nanmin(pixels)}, {np.nanmax(pixels)}]",
            "divide 0..255 data by 255 (or store it as uint8)",
        )
    return pixels.reshape(-1, *shape)


def _binary_images(
    path: Path, col: pa.ChunkedArray, ids: np.ndarray, shape: list[int] | None
) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    blobs = col.to_pylist()

    def open_image(row: int, decode: bool) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(blobs[row]))  # reads only the header
            if decode:
                img.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, TypeError) as e:
            raise _fail(
                path,
                f"image of row {row} (index {ids[row]}) cannot be decoded "
                f"({type(e).__name__}: {e})",
                "store PNG/JPEG bytes Pillow can open, or drop the row",
            ) from e
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise _fail(
                path,
                f"image of row {row} (index {ids[row]}) has mode {img.mode!r}",
                "save 8-bit images (mode L or RGB) or use the float array form",
            )
        return img

    # Pass 1, headers only: one mode and size for all; pass 2 decodes into the output,
    # so at most one decoded image is held at a time.
    headers = [open_image(row, decode=False) for row in range(len(blobs))]
    if shape is None:
        gray = all(img.getbands() in (("L",), ("1",), ("L", "A")) for img in headers)
        shape = [1 if gray else 3, headers[0].size[1], headers[0].size[0]]
    mode = {1: "L", 3: "RGB"}.get(shape[0])
    if mode is None:
        raise _fail(
            path,
            f"fqa.image_shape {shape} has {shape[0]} channels",
            "use 1 (grayscale) or 3 (RGB) channels for encoded images",
        )
    del headers
    size = (shape[2], shape[1])  # Pillow sizes are (W, H)
    out = np.empty((len(blobs), *shape), dtype=np.float32)
    for row in range(len(blobs)):
        img = open_image(row, decode=True).convert(mode)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / 255
        out[row] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _read_sidecar(path: Path) -> dict:
    meta_path = path.parent / "dataset.json"
    if not meta_path.exists():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except ValueError as e:
        raise _fail(meta_path, f"dataset.json is not valid JSON ({e})", "fix or delete it") from e


def check_schema(
    path: Path | Remote, schema: pa.Schema, require_caption: bool, require_label: bool
) -> tuple[bool, list[int] | None]:
    """Required columns and their types; returns (images are encoded bytes, [C, H, W])."""
    required = ["index", "image"] + ["label"] * require_label + ["caption"] * require_caption
    for name in required:
        if name not in schema.names:
            why = {
                "caption": " (CLIP tasks need a caption per image)",
                "label": " (classification needs a class id per image)",
            }.get(name, "")
            raise _fail(
                path,
                f"missing required column {name!r}{why}; it has {schema.names}",
                f"add a {name!r} column (see fqa.data's schema)",
            )
    image_type = schema.field("image").type
    is_binary = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    is_list = (
        pa.types.is_list(image_type)
        or pa.types.is_large_list(image_type)
        or pa.types.is_fixed_size_list(image_type)
    )
    if not (is_binary or (is_list and _is_float_or_uint8(image_type.value_type))):
        raise _fail(
            path,
            f"column 'image' has type {image_type}",
            "store encoded PNG/JPEG bytes (binary) or a list of float/uint8 pixels",
        )
    if "caption" in schema.names:
        caption_type = schema.field("caption").type
        if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
            raise _fail(
                path,
                f"column 'caption' has type {caption_type}, expected string",
                "store captions as strings",
            )
    shape = _shape_from_metadata(path, schema, required=is_list)
    return is_binary, shape


def ids_and_labels(path, table: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``index`` column (unique) and the ``label`` column if any (non-negative),
    checked; shared by the eager loader and the lazy index (fqa.lazy_data)."""
    ids = _int_column(path, table, "index")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise _fail(
            path,
            f"column 'index' has {len(dup)} duplicated values, e.g. {dup[:5].tolist()}",
            "give every datapoint a unique stable index",
        )
    labels = None
    if "label" in table.column_names:
        labels = _int_column(path, table, "label")
        if labels.min() < 0:
            row = int(np.argmin(labels))
            raise _fail(
                path,
                f"negative label {labels[row]} at index {ids[row]}",
                "class ids must be 0..num_classes-1",
            )
    return ids, labels


def load_image_dataset(
    path: str | Path, require_caption: bool = False, require_label: bool = True
) -> ImageDataset:
    """Read and validate one Parquet file (schema in this module's docstring); a local
    path or an object-store URI (fqa.storage)."""
    path = location(path)
    if not path.exists():
        raise _fail(path, "file not found", f"check the path, or {PREPARE_HINT}")
    if path.is_dir():
        raise _fail(
            path,
            "is a directory, not a Parquet file",
            "pass a .parquet file, or use load_splits(DIR) for a prepared directory",
        )
    try:
        source, filesystem = arrow_source(path)
        schema = pq.read_schema(source, filesystem=filesystem)
    except (pa.ArrowException, OSError) as e:
        raise _fail(
            path,
            f"not a readable Parquet file, perhaps corrupt or truncated ({e})",
            f"rewrite it with pyarrow.parquet.write_table, or {PREPARE_HINT}",
        ) from e

    is_binary, shape = check_schema(path, schema, require_caption, require_label)

    columns = [c for c in ("index", "image", "label", "caption") if c in schema.names]
    try:
        table = pq.read_table(source, columns=columns, filesystem=filesystem)
    except (pa.ArrowException, OSError) as e:
        raise _fail(
            path,
            f"cannot read its data, perhaps corrupt or truncated ({e})",
            f"rewrite the file, or {PREPARE_HINT}",
        ) from e
    if table.num_rows == 0:
        raise _fail(path, "dataset is empty (0 rows)", "write at least one datapoint")

    ids, labels = ids_and_labels(path, table)
    captions = None
    if "caption" in table.column_names:
        if table.column("caption").null_count:
            raise _fail(
                path,
                f"column 'caption' has {table.column('caption').null_count} null values",
                "give every row a caption, or drop the column",
            )
        captions = table.column("caption").to_pylist()
    col = table.column("image")
    if col.null_count:
        raise _fail(
            path, f"column 'image' has {col.null_count} null values", "give every row an image"
        )
    images = _binary_images(path, col, ids, shape) if is_binary else _array_images(path, col, shape)

    meta = _read_sidecar(path)
    num_classes = meta.get("num_classes")
    if labels is not None and num_classes is not None and labels.max() >= num_classes:
        raise _fail(
            path,
            f"label {labels.max()} is >= num_classes={num_classes} from dataset.json",
            "fix the labels or num_classes in dataset.json",
        )
    return ImageDataset(
        ids=torch.from_numpy(ids),
        images=torch.from_numpy(images),
        labels=None if labels is None else torch.from_numpy(labels),
        captions=captions,
        path=path,
        num_classes=num_classes,
        class_names=meta.get("class_names"),
    )


def check_splits(data_dir: str | Path) -> None:
    """The prepared directory holds every split file (nothing is read)."""
    data_dir = location(data_dir)
    missing = [s for s in SPLITS if not (data_dir / f"{s}.parquet").exists()]
    if missing:
        raise _fail(
            data_dir, f"missing split files {[f'{s}.parquet' for s in missing]}", PREPARE_HINT
        )


def load_splits(
    data_dir: str | Path,
    in_memory_mb: float | None = None,
    cache_mb: float = 256.0,
    **kwargs,
) -> dict[str, ImageDataset]:
    """Load train/validation/test.parquet from a prepared directory (a path or a URI);
    ids must not overlap.

    With ``in_memory_mb`` set, a split whose decoded images exceed it is opened lazily
    (fqa.lazy_data: rows read on demand through one row-group cache of ``cache_mb`` shared
    by the splits); the choice is logged. ``None`` loads everything into memory."""
    check_splits(data_dir)
    data_dir = location(data_dir)
    splits = {}
    cache = None
    for split in SPLITS:
        path = data_dir / f"{split}.parquet"
        if in_memory_mb is None:
            splits[split] = load_image_dataset(path, **kwargs)
            continue
        from fqa.lazy_data import RowGroupCache, decoded_bytes, open_lazy

        needs = _requirements(kwargs)
        size = _open_checked(path, partial(decoded_bytes, **needs))
        if size <= in_memory_mb * 2**20:
            log.info(
                "%s: %.1f MB decoded <= data.in_memory_mb=%g: loaded into memory",
                path, size / 2**20, in_memory_mb,
            )  # fmt: skip
            splits[split] = load_image_dataset(path, **kwargs)
        else:
            cache = cache or RowGroupCache(int(cache_mb * 2**20))
            log.info(
                "%s: %.1f MB decoded > data.in_memory_mb=%g: opened lazily, row groups read on "
                "demand through a %g MB cache (data.cache_mb)",
                path, size / 2**20, in_memory_mb, cache_mb,
            )  # fmt: skip
            splits[split] = _open_checked(path, partial(open_lazy, cache=cache, **needs))
    all_ids = np.concatenate([d.ids.numpy() for d in splits.values()])
    uniq, counts = np.unique(all_ids, return_counts=True)
    if len(uniq) != len(all_ids):
        raise _fail(
            data_dir,
            f"index values appear in more than one split, e.g. {uniq[counts > 1][:5].tolist()}",
            "make 'index' unique across train/validation/test",
        )
    return splits


def _requirements(kwargs: dict) -> dict:
    return {
        "require_caption": kwargs.get("require_caption", False),
        "require_label": kwargs.get("require_label", True),
    }


def _open_checked(path: Path | Remote, open_split: Callable):
    """Run a reader, turning an unreadable file into the usual DataError."""
    try:
        return open_split(path)
    except (pa.ArrowException, OSError) as e:
        raise _fail(
            path,
            f"not a readable Parquet file, perhaps corrupt or truncated ({e})",
            f"rewrite it with pyarrow.parquet.write_table, or {PREPARE_HINT}",
        ) from e


# --------------------------------------------------------------------------- digits


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Row indices per part, each class shuffled and cut by the fractions; sorted rows."""
    if len(fractions) != len(SPLITS) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"fractions must be {len(SPLITS)} positive numbers summing to 1, got {tuple(fractions)}"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        # Round the cumulative cut points so every class's parts add up exactly.
        cuts = np.round(np.cumsum(fractions)[:-1] * len(rows)).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def digit_caption(label: int) -> str:
    return f"a photo of the digit {DIGIT_NAMES[label]}"


def prepare_digits(
    out_dir: str | Path, seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> dict[str, Path]:
    """Write scikit-learn's digits as train/validation/test Parquet files + dataset.json."""
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()  # bundled with scikit-learn: no download
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    paths = {}
    sizes = {}
    for split, rows in zip(SPLITS, stratified_split(labels, fractions, seed), strict=True):
        paths[split] = write_image_parquet(
            out_dir / f"{split}.parquet",
            ids=rows,  # the row in sklearn's digits is the stable global index
            images=images[rows],
            labels=labels[rows],
            captions=[digit_caption(int(y)) for y in labels[rows]],
        )
        sizes[split] = len(rows)
    meta = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits",
        "num_classes": len(DIGIT_NAMES),
        "class_names": list(DIGIT_NAMES),
        "image_shape": [1, 8, 8],
        "splits": sizes,
        "seed": seed,
        "fractions": list(fractions),
    }
    # Written last: its presence means the split files are complete.
    _atomic_write(
        out_dir / "dataset.json",
        lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"),
    )
    return paths


def ensure_digits(data_dir: str | Path, seed: int = 0, **kwargs) -> dict[str, ImageDataset]:
    """Prepare digits in data_dir unless already there (with this seed); load the splits.
    On object storage they are prepared locally and uploaded, dataset.json last."""
    data_dir = location(data_dir)
    meta_path = data_dir / "dataset.json"
    complete = meta_path.exists() and all((data_dir / f"{s}.parquet").exists() for s in SPLITS)
    if complete:
        meta = _read_sidecar(data_dir / "train.parquet")
        if meta.get("name") != "digits" or meta.get("seed") != seed:
            raise _fail(
                data_dir,
                f"holds dataset {meta.get('name')!r} with seed "
                f"{meta.get('seed')!r}, not digits with seed {seed}",
                "use another directory or delete this one",
            )
    elif isinstance(data_dir, Remote):
        staging = scratch_dir("fqa-digits-")
        prepare_digits(staging, seed=seed)
        for name in (*(f"{s}.parquet" for s in SPLITS), "dataset.json"):
            (data_dir / name).upload(staging / name)
    else:
        prepare_digits(data_dir, seed=seed)
    return load_splits(data_dir, **kwargs)
