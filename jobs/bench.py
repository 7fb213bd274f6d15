"""``python -m jobs.bench variance|accuracy|throughput|fewshot|scaling [--quick] [--out DIR]``.

One command per benchmark (the modules of ``benchmarks/``); each writes ``<name>.json``
and ``<name>.png`` to ``--out`` (default ``docs/results``), prints its table and then, as
its last line, a one-line JSON naming what it wrote. ``scaling`` needs Ray (it joins a
running Ray instance when this process already has one, else starts an embedded one);
the others are pure PyTorch. ``fqa bench <name>`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from pathlib import Path

BENCHMARKS = ("variance", "accuracy", "throughput", "fewshot", "scaling")


def add_benchmarks(commands) -> None:
    """One subcommand per benchmark module, on an argparse ``add_subparsers()`` object."""
    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        summary = module.__doc__.splitlines()[0].split(": ", 1)[-1]
        sub = commands.add_parser(name, help=summary, description=module.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub)
        sub.set_defaults(benchmark=name)


def run_benchmark(args) -> int:
    importlib.import_module(f"benchmarks.{args.benchmark}").run(args)
    written = Path(args.out) / f"{args.benchmark}.json"
    print(json.dumps({"benchmark": args.benchmark, "json": str(written)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_benchmarks(parser.add_subparsers(dest="name", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
