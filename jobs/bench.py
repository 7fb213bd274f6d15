"""``python -m jobs.bench variance|accuracy|throughput|fewshot|scaling [--quick] [--out DIR]``.

One command per benchmark; each writes ``<name>.json`` and ``<name>.png`` to ``--out``
(default ``docs/results``) and prints its table. ``scaling`` needs Ray (it joins a
running Ray instance when this process already has one, else starts an embedded one);
the others are pure PyTorch (``fqa bench`` runs them too).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from benchmarks import fewshot
from fqa import bench_accuracy, bench_throughput, bench_variance


def _scaling(args) -> None:
    from jobs.bench_scaling import report_scaling, run

    report_scaling(
        run(args.config, args.quick, Path(args.out), Path(args.runs) / "scaling"), args.out
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True)
    for name, module, run in (
        ("variance", bench_variance, bench_variance.run_variance_bench),
        ("accuracy", bench_accuracy, bench_accuracy.run_accuracy_bench),
        ("throughput", bench_throughput, bench_throughput.run_throughput_bench),
        ("fewshot", fewshot, fewshot.run),
    ):
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0].split(": ", 1)[-1])
        module.add_arguments(sub)
        sub.set_defaults(run=run)
    scaling = commands.add_parser("scaling", help="cluster speedup and per-worker throughput")
    scaling.add_argument("--config", default="jobs/configs/vit_digits.yaml")
    scaling.add_argument("--out", default="docs/results")
    scaling.add_argument("--runs", default="runs/bench", help="scratch run directories")
    scaling.add_argument("--quick", action="store_true", help="tiny settings for tests")
    scaling.set_defaults(run=_scaling)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
