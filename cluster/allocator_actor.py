"""AllocatorActor: the one central owner of the allocator and the per-datapoint statistics.

It wraps ``fqa.step.QueryPlanner`` unchanged, so counts and shards are exactly those
the single-process trainer computes. ``RemotePlanner`` gives the driver the planner's
interface (plan / learn / state / stats / allocator) backed by the actor, so
``Trainer.step`` and ``Trainer.save`` run unchanged over it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from fqa.checkpoint import latest_checkpoint, load_checkpoint
from fqa.config import Config
from fqa.estimators import ShardResult
from fqa.setup import build_allocator, configured_estimator
from fqa.stats import DatapointStats
from fqa.step import Planned, QueryPlanner

log = logging.getLogger(__name__)

_MAX_RESTARTS = 4  # Ray restarts of the actor before the planner creates a new one
_RESTORE_TIMEOUT_S = 120.0  # waiting for Ray to restart the actor


class AllocatorStateLost(RuntimeError):
    """The actor was restarted by Ray and holds no state yet; the driver restores it."""


class AllocatorActor:
    def __init__(self, config_json: str, variance_scale: float) -> None:
        config = Config.model_validate_json(config_json)
        # planning is pure (ids, counts -> shards): no model needed, unlike build_estimator
        estimator = configured_estimator(config)
        self.planner = QueryPlanner(config, estimator, build_allocator(config), variance_scale)
        # a restarted actor reruns __init__ and would silently plan from empty statistics;
        # until the driver restores it, every call says so instead
        self.loaded = False
        # idempotency key of learn(): the last step learned; a retried call is ignored
        self.learned_step = -1
        self.duplicates = 0

    def _check(self) -> None:
        if not self.loaded:
            raise AllocatorStateLost("the AllocatorActor restarted and has not been restored")

    def ping(self) -> bool:
        return self.loaded

    def plan(self, step: int, ids: np.ndarray, losses: np.ndarray) -> Planned:
        self._check()
        return self.planner.plan(step, ids, losses)

    def learn(self, planned: Planned, results: list[ShardResult]) -> dict[str, float]:
        self._check()
        if planned.step <= self.learned_step:
            self.duplicates += 1  # Ray delivered this step's call twice: learn it once
            return {}
        self.learned_step = planned.step
        return self.planner.learn(planned, results)

    def duplicates_ignored(self) -> int:
        return self.duplicates

    def state(self) -> dict[str, Any]:
        self._check()
        return self.planner.state()

    def stats(self) -> DatapointStats:
        self._check()
        return self.planner.stats

    def allocator(self):
        self._check()
        return self.planner.allocator

    def load_state(
        self,
        state: dict[str, Any],
        stats: DatapointStats,
        replay: list[tuple[Planned, list[ShardResult]]] = (),
        step: int = 0,
    ) -> None:
        """The statistics and allocator as of ``step`` (a checkpoint), then the learn calls
        made since."""
        # arrays from the object store are read-only views; the statistics update in place
        self.planner.load_state(copy.deepcopy(state), copy.deepcopy(stats))
        self.learned_step = step - 1
        self.loaded = True
        for planned, results in copy.deepcopy(list(replay)):
            self.learn(planned, results)

    def load_checkpoint(
        self, path: str, replay: list[tuple[Planned, list[ShardResult]]], decay: float
    ) -> int:
        """``load_state`` from a checkpoint, verified and read here rather than in the
        driver (which would otherwise load the model's tensors too). Returns its step."""
        data = load_checkpoint(Path(path))
        step = int(data.state["step"])
        stats = DatapointStats.load(data.stats_path, decay)
        since = [entry for entry in replay if entry[0].step >= step]
        self.load_state({"allocator": data.state["allocator"]}, stats, since, step)
        return step


class RemotePlanner:
    """The ``QueryPlanner`` interface, forwarded to an AllocatorActor.

    If the actor is lost (killed, its node gone) a call fails with ``RayActorError``, or,
    once Ray has restarted it, with ``AllocatorStateLost``. The planner then restores the
    actor — Ray's restarted instance, or a new one once its restarts are used up — from
    the last checkpoint on the storage path (statistics + allocator state) and replays
    the ``learn`` calls made since that checkpoint, which it keeps (per-sample scalars
    only), so the restored actor is exactly the lost one; then it retries the call.
    """

    def __init__(
        self,
        config_json: str,
        variance_scale: float,
        checkpoint_dir: Path,
        state: dict[str, Any],
        stats: DatapointStats,
        start_step: int,
    ) -> None:
        self._args = (config_json, variance_scale)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.decay = Config.model_validate_json(config_json).allocator.stats_decay
        # the state the actor started from, used when no checkpoint exists yet
        self._initial = (copy.deepcopy(state), copy.deepcopy(stats), start_step)
        self._learned: list[tuple[Planned, list[ShardResult]]] = []  # since the checkpoint
        self.restores = 0  # times the actor was restored
        self.actor = self._spawn()
        ray.get(self.actor.load_state.remote(state, stats, (), start_step))

    def _spawn(self) -> ray.actor.ActorHandle:
        actor = ray.remote(num_cpus=0, max_restarts=_MAX_RESTARTS)(AllocatorActor)
        return actor.remote(*self._args)

    # ---- the planner interface ---------------------------------------------------------
    def plan(self, step: int, ids: np.ndarray, losses: np.ndarray) -> Planned:
        return self._call("plan", step, ids, losses)

    def learn(self, planned: Planned, results: list[ShardResult]) -> dict[str, float]:
        # statistics need the per-sample scalars only, never the lr gradient tensors; the
        # arrays are copied because a view would pin the whole deserialized result (its
        # gradients included) in memory until the next checkpoint
        light = [
            dataclasses.replace(
                r,
                grads=None,
                ids=np.array(r.ids),
                values=np.array(r.values),
                stat_values=np.array(r.stat_values),
            )
            for r in results
        ]
        learned = self._call("learn", planned, light)
        self._learned.append((planned, light))
        return learned

    def state(self) -> dict[str, Any]:
        return self._call("state")

    def load_state(self, state: dict[str, Any], stats: DatapointStats) -> None:
        self._call("load_state", state, stats)

    @property
    def stats(self) -> DatapointStats:
        return self._call("stats")

    @property
    def allocator(self):
        return self._call("allocator")

    def checkpointed(self, step: int) -> None:
        """A checkpoint at ``step`` now holds everything learned before it."""
        self._learned = [entry for entry in self._learned if entry[0].step >= step]

    # ---- recovery ---------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        for _ in range(_MAX_RESTARTS + 2):
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except (RayActorError, AllocatorStateLost) as exc:
                log.warning("the AllocatorActor was lost (%s); restoring it", type(exc).__name__)
                self.restore()
        raise RuntimeError(f"the AllocatorActor could not be restored for {method}()")

    def restore(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        deadline = time.monotonic() + _RESTORE_TIMEOUT_S
        while True:
            try:
                step = self._load(path)
                break
            except RayActorError:
                if actor_is_dead(self.actor):  # no restarts left (or a dead node): a new actor
                    self.actor = self._spawn()
                    continue
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.restores += 1
        log.info("AllocatorActor restored from step %d + the learn calls since", step)

    def _load(self, path: Path | None) -> int:
        """The last checkpoint (else the state the actor started from), then the learn
        calls made since."""
        if path is None:
            state, stats, step = self._initial
            replay = [entry for entry in self._learned if entry[0].step >= step]
            ray.get(self.actor.load_state.remote(state, stats, replay, step))
            return step
        # the checkpoint's step is read in the actor, which replays the calls since it
        return ray.get(self.actor.load_checkpoint.remote(str(path), self._learned, self.decay))

    def close(self) -> None:
        ray.kill(self.actor)


def actor_is_dead(actor: ray.actor.ActorHandle) -> bool:
    """True once Ray will not restart the actor (its restarts are used up)."""
    try:
        from ray._private.state import actors  # GCS actor table; no dashboard needed

        return actors(actor._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # the internal API moved: keep waiting until the deadline
        return False
