"""``python -m jobs.sweep --config jobs/configs/sweep_<name>.yaml [--resume] [--set k=v]``

A Ray Tune sweep over jobs.train configs (one distributed ClusterTrainer per trial), also
the entrypoint for ``ray job submit --working-dir . -- python -m jobs.sweep ...``. The
whole sweep file is checked (space, metric, resources) before any trial starts. Outputs
land in storage/name: results.parquet/.csv, ranking.md, best_config.yaml, curves.png,
best.png; a one-line JSON summary is printed last. ``--resume`` continues a sweep whose
driver died (Tuner.restore): finished trials are kept, unfinished ones resume from
their checkpoints. ``--set`` overrides sweep keys (``num_samples=2``) or, prefixed with
``config.``, the trial config (``config.train.batch_size=32``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

from fqa.config import ConfigError, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="sweep YAML, e.g. jobs/configs/sweep_digits.yaml"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in its storage dir"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    owns_ray = joined = False
    try:
        from cluster.sweep_config import load_sweep

        sweep, base = load_sweep(args.config, parse_overrides(args.set))  # before Ray starts
        import ray

        from cluster.runtime import connect
        from cluster.sweep_results import write_outputs
        from cluster.tune import run_sweep

        joined = not ray.is_initialized()  # this process connected (or started) Ray itself
        owns_ray = connect()
        results, sweep_dir = run_sweep(sweep, base, resume=args.resume)
        summary = write_outputs(results, sweep, base, sweep_dir)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        print((sweep_dir / "ranking.md").read_text(), flush=True)
    except KeyboardInterrupt:
        print("error: interrupted; rerun with --resume to continue the sweep", file=sys.stderr)
        return 130
    except Exception as exc:
        from cluster.runtime import ClusterResourceError

        expected = (ConfigError, ClusterResourceError, FileNotFoundError, FileExistsError)
        if not isinstance(exc, expected):
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        # disconnect even from a cluster this process only joined: Ray flushes its
        # deduplicated worker logs then, so they land before the summary line
        if owns_ray or joined:
            ray.shutdown()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
