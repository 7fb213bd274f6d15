"""``python -m jobs.train --config jobs/configs/<name>.yaml [--workers N] [--set k=v]``

The entrypoint for ``ray job submit --working-dir . -- python -m jobs.train ...``: it
joins the cluster it was submitted to (``RAY_ADDRESS``) or starts an embedded one,
trains with the distributed driver, writes the run directory under run.out_dir/run.name
(resubmitting the same run name resumes it) and prints a one-line JSON summary last,
which names the run directory (``run_dir``). Any failure exits non-zero with a one-line
reason on stderr.

Under ``ray job submit`` the process runs inside Ray's temporary copy of the working
directory, which changes with every upload and cluster restart: a relative
``run.out_dir``, ``data.dir`` or ``pretrain.cache_dir`` would put results where no later
job finds them (and where other nodes cannot read them). They are refused, unless
``FQA_STORAGE_ROOT`` names a persistent location (an absolute path every node sees, or
an ``s3://``/``gs://`` prefix) under which they are resolved, and logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Any

log = logging.getLogger("jobs.train")

# the config fields naming storage that must outlive the job (the cache only when used)
_PERSISTENT_FIELDS = ("run.out_dir", "data.dir", "pretrain.cache_dir")


def in_ray_job() -> bool:
    """True in the entrypoint of ``ray job submit`` (Ray's job supervisor sets the job
    config variable; its working directory is a ``runtime_resources`` copy)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_ID" in os.environ


def resolve_job_paths(config):
    """Under a Ray job, relative storage fields are resolved under FQA_STORAGE_ROOT (and
    logged) or refused; elsewhere the config is returned unchanged."""
    from fqa.config import ConfigError, with_overrides

    if not in_ray_job():
        return config
    root = os.environ.get("FQA_STORAGE_ROOT")
    if root and "://" not in root and not os.path.isabs(root):
        raise ConfigError(
            f"FQA_STORAGE_ROOT={root!r} is relative; under a Ray job it must be an absolute "
            "path every node sees, or an s3://BUCKET/PREFIX URI"
        )
    data = config.model_dump(mode="json")
    relative = {}
    pretraining = config.pretrain.enabled and not config.model.checkpoint
    for dotted in _PERSISTENT_FIELDS if pretraining else _PERSISTENT_FIELDS[:2]:
        section, name = dotted.split(".")
        value = data[section][name]
        if "://" not in value and not os.path.isabs(value):
            relative[dotted] = value
    if not relative:
        return config
    if not root:
        shown = ", ".join(f"{k}={v!r}" for k, v in relative.items())
        raise ConfigError(
            f"under a Ray job the relative {shown} would land in Ray's temporary copy of the "
            f"working directory ({os.getcwd()}), lost on the next upload or restart. Set "
            "them to absolute paths every node sees or s3://… URIs (--set run.out_dir=…), or "
            "set FQA_STORAGE_ROOT in the job's runtime_env to resolve them under it"
        )
    resolved = {k: f"{root.rstrip('/')}/{v.removeprefix('./')}" for k, v in relative.items()}
    for dotted, value in resolved.items():
        log.info("Ray job: %s=%r resolved to %s (FQA_STORAGE_ROOT)", dotted, relative[dotted], value)
    return with_overrides(config, resolved)



def run(config) -> dict[str, Any]:
    from cluster.driver import ClusterTrainer
    from fqa.backprop import with_pretrained

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
        from fqa.config import load_config, parse_overrides

        overrides = parse_overrides(args.set)
        if args.workers is not None:
            overrides["cluster.num_workers"] = args.workers
        summary = run(resolve_job_paths(load_config(args.config, overrides)))
    except KeyboardInterrupt:
        print("error: interrupted; resubmit with the same run.name to resume", file=sys.stderr)
        return 130
    except ImportError as exc:  # the cluster's Python lacks the project's dependencies
        print(
            f"error: {type(exc).__name__}: {exc}; this Python ({sys.executable}) lacks the "
            "project's dependencies: start Ray from the project's environment "
            "(pip install -e .) or give the job a runtime_env with them",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        if not isinstance(exc, _expected_errors()):
            traceback.print_exc()  # a bug, not bad input: keep the stack for the report
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """Bad input (config, data, weights: all ValueErrors) and cluster conditions, which
    are reported in one line, not traced; an import failing here must not raise again."""
    expected: list[type[Exception]] = [ValueError]
    for module, name in (
        ("cluster.driver", "ClusterError"),
        ("cluster.runtime", "ClusterResourceError"),
        ("fqa.trainer", "TrainingError"),
    ):
        try:
            expected.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:
            pass
    return tuple(expected)


if __name__ == "__main__":
    sys.exit(main())
