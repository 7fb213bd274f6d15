"""``python -m jobs.train --config jobs/configs/<name>.yaml [--workers N] [--set k=v]``

The entrypoint for ``ray job submit --working-dir . -- python -m jobs.train ...``: it
joins the cluster it was submitted to (``RAY_ADDRESS``) or starts an embedded one,
trains with the distributed driver, writes the run directory under run.out_dir/run.name
(resubmitting the same run name resumes it) and prints a one-line JSON summary last.
Any failure exits non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Any

from fqa.backprop import with_pretrained
from fqa.config import Config, ConfigError, load_config, parse_overrides


def run(config: Config) -> dict[str, Any]:
    from cluster.driver import ClusterTrainer

    trainer = ClusterTrainer(with_pretrained(config))
    summary = trainer.fit()
    trainer.storage.plot(config.run.name)  # curves.png beside the metrics, local or remote
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="YAML config, e.g. jobs/configs/vit_digits.yaml"
    )
    parser.add_argument("--workers", type=int, help="QueryWorker actors (cluster.num_workers)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.set)
        if args.workers is not None:
            overrides["cluster.num_workers"] = args.workers
        summary = run(load_config(args.config, overrides))
    except KeyboardInterrupt:
        print("error: interrupted; resubmit with the same run.name to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        from cluster.driver import ClusterError
        from cluster.runtime import ClusterResourceError
        from fqa.checkpoint import CheckpointError
        from fqa.trainer import TrainingError

        # bad input (config, data, weights: all ValueErrors) is reported, not traced
        bad_input = (ConfigError, CheckpointError, ValueError)
        expected = (*bad_input, ClusterResourceError, ClusterError, TrainingError)
        if not isinstance(exc, expected):
            traceback.print_exc()  # a bug, not bad input: keep the stack for the report
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
