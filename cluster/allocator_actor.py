"""AllocatorActor: the one central owner of the allocator and the per-datapoint statistics.

It wraps ``fqa.step.QueryPlanner`` unchanged, so counts and shards are exactly those
the single-process trainer computes. ``RemotePlanner`` gives the driver the planner's
interface (plan / learn / state / stats / allocator) backed by the actor, which lets the
driver reuse ``Trainer.apply_step`` and ``Trainer.save`` as they are.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import ray

from fqa.config import Config
from fqa.estimators import ShardResult, create_estimator
from fqa.setup import build_allocator
from fqa.stats import DatapointStats
from fqa.step import Planned, QueryPlanner


class AllocatorActor:
    def __init__(self, config_json: str, variance_scale: float) -> None:
        config = Config.model_validate_json(config_json)
        est = config.estimator
        # planning is pure (ids, counts -> shards): no model needed, unlike build_estimator
        estimator = create_estimator(
            est.name,
            epsilon=est.epsilon,
            sigma=est.sigma,
            antithetic=est.antithetic,
            hook_conv=est.hook_conv,
        )
        self.planner = QueryPlanner(config, estimator, build_allocator(config), variance_scale)

    def plan(self, step: int, ids: np.ndarray, losses: np.ndarray) -> Planned:
        return self.planner.plan(step, ids, losses)

    def learn(self, planned: Planned, results: list[ShardResult]) -> dict[str, float]:
        return self.planner.learn(planned, results)

    def state(self) -> dict[str, Any]:
        return self.planner.state()

    def stats(self) -> DatapointStats:
        return self.planner.stats

    def allocator(self):
        return self.planner.allocator

    def load_state(self, state: dict[str, Any], stats: DatapointStats) -> None:
        # arrays from the object store are read-only views; the statistics update in place
        self.planner.load_state(copy.deepcopy(state), copy.deepcopy(stats))


class RemotePlanner:
    """The ``QueryPlanner`` interface, forwarded to an AllocatorActor."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    def plan(self, step: int, ids: np.ndarray, losses: np.ndarray) -> Planned:
        return ray.get(self.actor.plan.remote(step, ids, losses))

    def learn(self, planned: Planned, results: list[ShardResult]) -> dict[str, float]:
        # statistics need the per-sample scalars only, never the lr gradient tensors
        light = [dataclasses.replace(r, grads=None) for r in results]
        return ray.get(self.actor.learn.remote(planned, light))

    def state(self) -> dict[str, Any]:
        return ray.get(self.actor.state.remote())

    def load_state(self, state: dict[str, Any], stats: DatapointStats) -> None:
        ray.get(self.actor.load_state.remote(state, stats))

    @property
    def stats(self) -> DatapointStats:
        return ray.get(self.actor.stats.remote())

    @property
    def allocator(self):
        return ray.get(self.actor.allocator.remote())
