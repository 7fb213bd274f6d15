"""The ``fqa`` command line: ``fqa train``, ``fqa data prepare``, ``fqa bench <name>``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fqa", description="forward query allocation")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a training job from a YAML config")
    train.add_argument("config", help="YAML config, e.g. jobs/configs/vit_digits.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    train.add_argument("--no-compare", action="store_true", help="skip the comparison runs")
    train.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run the main job on N Ray QueryWorkers (cluster layer; embedded Ray unless "
        "RAY_ADDRESS is set). Without it, training is single-process",
    )

    data = commands.add_parser("data", help="dataset utilities")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="write a bundled dataset as Parquet")
    prepare.add_argument("name", choices=["digits"])
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--seed", type=int, default=0)

    from jobs.bench import add_benchmarks, run_benchmark

    bench = commands.add_parser("bench", help="benchmarks (the same as python -m jobs.bench)")
    add_benchmarks(bench.add_subparsers(dest="bench_command", required=True))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fqa.checkpoint import CheckpointError
    from fqa.config import ConfigError
    from fqa.data import DataError

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "data":
            from fqa.data import prepare_digits

            paths = prepare_digits(args.out, seed=args.seed)
            print(json.dumps({k: str(v) for k, v in paths.items()}))
            return 0
        if args.command == "bench":
            return run_benchmark(args)
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        print(f"fqa: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _train(args) -> int:
    from fqa.config import load_config, parse_overrides, with_overrides
    from fqa.trainer import TrainingError
    from jobs.experiment import run_experiment

    overrides = parse_overrides(args.set)
    factory = None
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        overrides["cluster.num_workers"] = args.workers
        factory = _cluster_trainer()
    config = load_config(args.config, overrides)
    if args.no_compare:
        config = with_overrides(config, {"compare.backprop": False, "compare.allocators": []})
    cluster_errors: tuple[type[Exception], ...] = ()
    if factory:
        from cluster.driver import ClusterError
        from cluster.runtime import ClusterResourceError

        cluster_errors = (ClusterError, ClusterResourceError)
    try:
        result = run_experiment(config, factory) if factory else run_experiment(config)
    except TrainingError as exc:
        print(f"fqa: training stopped: {exc}", file=sys.stderr)
        return 3
    except cluster_errors as exc:
        print(f"fqa: cluster error: {exc}", file=sys.stderr)
        return 4
    # the table once; the last line points at the numbers instead of repeating them
    print(result["table"])
    comparison = str(Path(result["dir"]) / "comparison.json")
    print(
        json.dumps(
            {
                "dir": result["dir"],
                "comparison": comparison,
                "runs": [r["run"] for r in result["runs"]],
            }
        )
    )
    return 0


def _cluster_trainer():
    """The Ray layer, imported only for --workers: fqa itself never imports Ray."""
    try:
        from cluster.driver import ClusterTrainer
    except ImportError as exc:
        raise ValueError(
            f"--workers needs the cluster layer and Ray ({exc}); install with "
            "pip install -e . (ray[default] is a dependency) or drop --workers"
        ) from None
    return ClusterTrainer


if __name__ == "__main__":
    sys.exit(main())
