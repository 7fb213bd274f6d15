"""``python -m jobs.make_big_parquet write --out DIR [--rows N] [--size S]`` and
``python -m jobs.make_big_parquet measure --data DIR --in-memory-mb X --cache-mb Y``

``write`` generates a random-image classification dataset in fqa's Parquet layout
(train/validation/test.parquet + dataset.json; uint8 pixel arrays, ``--row-group`` rows
per row group), streamed so the generator never holds it all. Each class has its own
mean brightness, so a model can learn something. ``--out`` may be a URI (fqa.storage).

``measure`` trains the tiny ViT single-process on such a dataset for a few steps (with
evaluation of the splits, so every row is read) and prints one JSON line: the decoded
dataset size, the cache cap, the lazy/eager choice, the cache's peak bytes, and the
process's peak RSS — run it once with the cache capped below the dataset and once fully
in memory to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fqa.data import SHAPE_KEY, SPLITS
from fqa.storage import Remote, location, scratch_dir


def write_random_images(
    path: Path,
    ids: np.ndarray,
    shape: tuple[int, int, int],
    classes: int,
    row_group: int,
    seed: int,
) -> None:
    """One split: rows for ``ids`` written a row group at a time."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    schema = pa.schema(
        [("index", pa.int64()), ("image", pa.list_(pa.uint8(), size)), ("label", pa.int64())],
        metadata={SHAPE_KEY: json.dumps(list(shape))},
    )
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, len(ids), row_group):
            chunk = ids[start : start + row_group]
            labels = rng.integers(0, classes, len(chunk))
            mean = 40 + 175 * labels[:, None] / max(classes - 1, 1)
            pixels = np.clip(rng.normal(mean, 40, (len(chunk), size)), 0, 255).astype(np.uint8)
            images = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), size)
            table = pa.table({"index": chunk, "image": images, "label": labels}, schema=schema)
            writer.write_table(table, row_group_size=row_group)


def write(args) -> dict:
    out = location(args.out)
    local = scratch_dir("fqa-big-") if isinstance(out, Remote) else out
    local.mkdir(parents=True, exist_ok=True)
    shape = (args.channels, args.size, args.size)
    cuts = np.cumsum([int(args.rows * 0.8), int(args.rows * 0.1)])
    parts = np.split(np.arange(args.rows, dtype=np.int64), cuts)
    for seed, (split, ids) in enumerate(zip(SPLITS, parts, strict=True)):
        write_random_images(local / f"{split}.parquet", ids, shape, args.classes, args.row_group, seed)
    meta = {"name": "random-images", "num_classes": args.classes, "image_shape": list(shape)}
    (local / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    if isinstance(out, Remote):  # dataset.json last: its presence means complete
        for name in (*(f"{s}.parquet" for s in SPLITS), "dataset.json"):
            (out / name).upload(local / name)
    file_bytes = sum((local / f"{s}.parquet").stat().st_size for s in SPLITS)
    return {
        "out": str(out),
        "rows": args.rows,
        "file_mb": round(file_bytes / 2**20, 1),
        "decoded_mb": round(args.rows * np.prod(shape) * 4 / 2**20, 1),
    }


def measure(args) -> dict:
    import torch

    from fqa.config import parse_config
    from fqa.trainer import Trainer

    torch.set_num_threads(1)
    meta = json.loads((location(args.data) / "dataset.json").read_text())
    channels, size, _ = meta["image_shape"]
    config = parse_config(
        {
            "run": {"name": "big", "out_dir": str(scratch_dir("fqa-measure-")), "resume": False},
            "data": {
                "dataset": "parquet",
                "dir": args.data,
                "in_memory_mb": args.in_memory_mb,
                "cache_mb": args.cache_mb,
            },
            "model": {
                "kwargs": {
                    "img_size": 16, "patch_size": 4, "in_chans": channels,
                    "embed_dim": 32, "depth": 2, "num_heads": 2,
                },
                "input_size": 16,
            },
            "trainable": {"mode": "head"},
            "train": {
                "steps": args.steps, "batch_size": 64, "queries_per_datapoint": 2,
                "eval_every": args.steps, "checkpoint_every": args.steps, "progress": False,
            },
        }
    )  # fmt: skip
    trainer = Trainer(config)
    summary = trainer.fit()  # evaluates validation and test: every row of them is read
    train = trainer.task._splits["train"]
    cache = getattr(train, "cache", None)
    rows = sum(len(ds) for ds in trainer.task._splits.values())
    return {
        "data": args.data,
        "decoded_mb": round(rows * channels * size * size * 4 / 2**20, 1),
        "in_memory_mb": args.in_memory_mb,
        "cache_mb": args.cache_mb,
        "lazy": cache is not None,
        "cache_peak_mb": round(cache.peak_bytes / 2**20, 1) if cache else None,
        "cache_misses": cache.misses if cache else None,
        "steps": summary["steps"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_big_parquet")
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="write a random-image Parquet dataset")
    w.add_argument("--out", required=True, help="directory or URI")
    w.add_argument("--rows", type=int, default=40_000)
    w.add_argument("--size", type=int, default=32, help="image height = width")
    w.add_argument("--channels", type=int, default=3)
    w.add_argument("--classes", type=int, default=10)
    w.add_argument("--row-group", type=int, default=256, help="rows per Parquet row group")
    m = commands.add_parser("measure", help="train briefly on it and print peak memory")
    m.add_argument("--data", required=True)
    m.add_argument("--in-memory-mb", type=float, default=0.0, help="0: always lazy")
    m.add_argument("--cache-mb", type=float, default=64.0)
    m.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "write" and (args.rows < 10 or args.size < 1 or args.row_group < 1):
        print("error: --rows must be >= 10, --size and --row-group >= 1", file=sys.stderr)
        return 2
    print(json.dumps(write(args) if args.command == "write" else measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
