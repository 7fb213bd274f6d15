"""Where Ray runs: join the cluster we were submitted to, or start a private local one.

A bare ``ray.init()`` attaches to whatever local cluster happens to be running (often
a stale one); we only join an address that was given explicitly (``RAY_ADDRESS``, which
``ray job submit`` sets for its entrypoint) and otherwise start a fresh embedded instance.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

_OBJECT_STORE_BYTES = 200 * 1024**2  # the results are small; keep the embedded store small


class ClusterResourceError(RuntimeError):
    """The cluster cannot place the requested workers; the message names the resources."""


def connect(num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Connect this process to Ray. Returns True when it started an embedded instance
    (the caller then owns it and should ``ray.shutdown()`` it)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
        return False
    ray.init(
        address="local",  # never attach to a cluster someone else started
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # nothing listens beyond this machine
        object_store_memory=object_store_memory or _OBJECT_STORE_BYTES,
    )
    log.info("started an embedded Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
    return True


def require_resources(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Fail fast, naming the numbers, when the workers can never be placed (Ray would
    otherwise leave the actors pending forever)."""
    total = ray.cluster_resources()
    need = {"CPU": num_workers * cpus_per_worker, "GPU": num_workers * gpus_per_worker}
    for name, amount in need.items():
        have = float(total.get(name, 0.0))
        if amount > have + 1e-9:
            per = cpus_per_worker if name == "CPU" else gpus_per_worker
            raise ClusterResourceError(
                f"{num_workers} workers x {per:g} {name} = {amount:g} {name} requested, but the "
                f"Ray cluster has {have:g} {name} in total (cluster resources: "
                f"{_describe(total)}). Lower cluster.num_workers or cluster."
                f"{'cpus' if name == 'CPU' else 'gpus'}_per_worker, or add nodes"
                + (" with GPUs (gpus_per_worker=0 runs on CPUs)" if name == "GPU" else "")
            )


def _describe(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "none"
