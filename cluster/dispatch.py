"""One step's shards on the QueryWorkers: dispatch, time out, re-dispatch, apply once.

Ray delivers at least once: a worker that dies or hangs mid-shard has its shards run
again elsewhere, and the first result for a shard can race with a late one. Each
result is therefore keyed by (step, shard index) and accepted exactly once; a second
result for the same key is dropped and counted, never reduced into the gradient.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError

from cluster.worker import ReplicaBehind
from fqa.estimators import ShardResult

if TYPE_CHECKING:
    from cluster.driver import RayWorkerPool
    from fqa.estimators import Shard

log = logging.getLogger(__name__)

_IN_FLIGHT = 2  # shards queued per worker, so a worker never idles between shards
_POLL_S = 1.0  # how often the dispatcher looks for shards past their timeout


class StepLedger:
    """The idempotency keys of one step: which shards have a result (accepted once)."""

    def __init__(self, step: int, size: int) -> None:
        self.step = step
        self.results: list[ShardResult | None] = [None] * size
        # (worker, its generation) whose result was accepted: where lr's sums are held
        self.owners: list[tuple[int, int] | None] = [None] * size
        self.duplicates = 0  # results for a key that already had one (ignored)

    def has(self, shard: int) -> bool:
        return self.results[shard] is not None

    def accept(
        self, step: int, shard: int, result: ShardResult, owner: tuple[int, int] | None = None
    ) -> bool:
        """Record the result for (step, shard); False (and counted) if one exists."""
        if step != self.step:
            raise ValueError(f"result for step {step} offered to the ledger of step {self.step}")
        if self.has(shard):
            self.duplicates += 1
            return False
        self.results[shard] = result
        self.owners[shard] = owner
        return True

    def complete(self) -> bool:
        return all(r is not None for r in self.results)


def evaluate_on_workers(
    pool: RayWorkerPool,
    step: int,
    shards: list[Shard],
    indices: list[int] | None = None,
    hook: bool = True,
) -> StepLedger:
    """Shards go out a few per worker and come back as they complete; a dead worker's
    shards run again elsewhere, and a worker that holds a shard past
    ``cluster.shard_timeout_s`` is killed (Ray restarts it) and its shards re-run.
    ``indices``: each shard's index in the step's plan (default: its position), the key
    under which a worker keeps what the shard leaves with it."""
    indices = list(range(len(shards))) if indices is None else indices
    timeout = pool.config.cluster.shard_timeout_s
    ledger = StepLedger(step, len(shards))
    pending = deque(range(len(shards)))
    # ref -> (shard, worker, worker generation, submitted at)
    in_flight: dict[ray.ObjectRef, tuple[int, int, int, float]] = {}
    hooked = pool.fault_hook is None or not hook  # tests' faults: once per step
    while not ledger.complete():
        live = pool._live()
        load = {i: 0 for i in live}
        for _, worker, _, _ in in_flight.values():
            load[worker] = load.get(worker, 0) + 1
        for index in live:
            while pending and load[index] < _IN_FLIGHT:
                shard = pending.popleft()
                if ledger.has(shard):
                    continue
                ref = pool.workers[index].evaluate.remote(shards[shard], step, indices[shard])
                in_flight[ref] = (shard, index, pool.generation[index], time.monotonic())
                load[index] += 1
        if not hooked:
            hooked = True
            pool.fault_hook(pool, step)
        if not in_flight:
            continue  # every in-flight shard's worker was lost; _live() rebuilds them
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_POLL_S)
        if not done:
            _time_out(pool, in_flight, timeout)
            continue
        shard, index, generation, _ = in_flight.pop(done[0])
        try:
            result = ray.get(done[0])
        except (RayActorError, ReplicaBehind):
            pool._lost(index, generation)
            waiting = shard in pending or any(s == shard for s, *_ in in_flight.values())
            if not ledger.has(shard) and not waiting:
                pending.appendleft(shard)
                pool.redispatched += 1
            continue
        ledger.accept(step, shard, result, (index, generation))
    return ledger


def _time_out(
    pool: RayWorkerPool,
    in_flight: dict[ray.ObjectRef, tuple[int, int, int, float]],
    limit: float,
) -> None:
    """Kill every worker holding a shard past the limit; its calls then fail with
    RayActorError and the loop re-dispatches their shards."""
    now = time.monotonic()
    hung = {
        (index, generation)
        for shard, index, generation, started in in_flight.values()
        if now - started > limit
    }
    for index, generation in sorted(hung):
        if generation == pool.generation[index]:
            pool._hung(index, f"a shard took over cluster.shard_timeout_s={limit:g}s")
