"""The two halves of a training step that different processes own in the cluster.

``QueryPlanner`` owns the allocator and the per-datapoint statistics: it turns a
batch's pre-pass losses into counts and shards, and learns from the results (the
AllocatorActor wraps it). ``ReplicaUpdater`` owns a model replica's optimizer: it
reduces shard results into ``.grad`` and steps (every QueryWorker wraps one, and so
does the single-process trainer), so all paths run exactly this code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fqa.allocators import Allocation, AllocationRequest, Allocator
from fqa.config import Config
from fqa.estimators import Estimator, Shard, ShardResult, Update
from fqa.seeding import derive_seed
from fqa.setup import set_learning_rate
from fqa.stats import DatapointStats


@dataclass
class Planned:
    step: int
    request: AllocationRequest
    allocation: Allocation
    shards: list[Shard]
    seconds: float  # allocation + sharding time (the allocator's overhead)


class QueryPlanner:
    def __init__(
        self, config: Config, estimator: Estimator, allocator: Allocator, variance_scale: float
    ) -> None:
        self.config = config
        self.estimator = estimator
        self.allocator = allocator
        self.stats = DatapointStats(config.allocator.stats_decay)
        self.variance_scale = variance_scale  # E[stat²] -> v_i (spsa: D−1, docs/METHOD.md §7)

    def plan(self, step: int, ids: np.ndarray, losses: np.ndarray) -> Planned:
        cfg = self.config
        started = time.perf_counter()
        count, _, second_moment = self.stats.lookup(ids)
        request = AllocationRequest(
            ids=ids,
            losses=losses,
            budget=cfg.sample_budget(),
            n_min=cfg.allocator.n_min,
            seed=derive_seed(cfg.run.seed, "allocation", step),
            variance=second_moment * self.variance_scale,
            observations=count,
        )
        allocation = self.allocator.allocate(request)
        shards = self.estimator.plan(
            ids,
            allocation.counts,
            losses,
            derive_seed(cfg.run.seed, "queries", step),
            cfg.estimator.shard_rows,
        )
        return Planned(step, request, allocation, shards, time.perf_counter() - started)

    def learn(self, planned: Planned, results: list[ShardResult]) -> dict[str, float]:
        """Statistics from this step's samples, then the allocator learns from them."""
        started = time.perf_counter()
        if results:  # one merge per step: decay then ages history once, not once per shard
            self.stats.update(
                np.concatenate([r.ids for r in results]),
                np.concatenate([r.stat_values for r in results]),
            )
        _, _, second_moment = self.stats.lookup(planned.request.ids)
        update = self.allocator.update(
            planned.request, planned.allocation, second_moment * self.variance_scale
        )
        return {
            **{f"alloc_{k}": v for k, v in update.items()},
            "learn_seconds": time.perf_counter() - started,
        }

    def state(self) -> dict[str, Any]:
        return {"allocator": self.allocator.state_dict()}

    def load_state(self, state: dict[str, Any], stats: DatapointStats) -> None:
        self.allocator.load_state_dict(state["allocator"])
        self.stats = stats

    def checkpointed(self, step: int) -> None:
        """A checkpoint at ``step`` holds everything learned before it (nothing to trim
        here; the remote planner drops its replay log)."""

    def close(self) -> None:
        """Nothing to release in process (the remote planner kills its actor)."""


@dataclass(frozen=True)
class UpdateOutcome:
    grad_norm: float
    nonfinite: int  # non-finite queries in this step (pre-pass included)
    skipped: bool  # nothing reached the parameters


class ReplicaUpdater:
    def __init__(
        self, config: Config, task, estimator: Estimator, optimizer: torch.optim.Optimizer
    ) -> None:
        self.config = config
        self.task = task
        self.estimator = estimator
        self.optimizer = optimizer
        self.params = [p for _, p in task.trainable_parameters()]

    def apply(self, step: int, update: Update, prepass_nonfinite: int = 0) -> UpdateOutcome:
        """Write the update into .grad and step — unless anything is non-finite, then drop
        the step."""
        nonfinite = update.nonfinite + prepass_nonfinite
        self.estimator.write_grad(self.task, update)
        grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params)))
        skipped = nonfinite > 0 or not np.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            set_learning_rate(self.optimizer, self.config, step)
            if self.config.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
            self.optimizer.step()
        return UpdateOutcome(grad_norm, nonfinite, skipped)


def step_metrics(
    planned: Planned,
    prepass: dict[str, np.ndarray],
    results: list[ShardResult],
    outcome: UpdateOutcome,
    variance_scale: float,
) -> dict[str, Any]:
    """Per-step metrics from the pre-pass, the allocation and the results."""
    counts = planned.allocation.counts
    return {
        "step": planned.step,
        "loss": float(np.mean(prepass["loss"])),
        "accuracy": float(np.mean(prepass["correct"])),
        "grad_norm": outcome.grad_norm,
        "grad_var": variance_estimate(planned, results, variance_scale),
        "alloc_min": int(counts.min()),
        "alloc_max": int(counts.max()),
        "alloc_cv": float(counts.std() / counts.mean()),
        "nonfinite": outcome.nonfinite,
        "skipped": outcome.skipped,
        "plan_seconds": planned.seconds,
    }


def variance_estimate(planned: Planned, results: list[ShardResult], variance_scale: float) -> float:
    """(1/B²) Σ_i mean_k(‖ĝ_ik‖²)/n_i from this step's samples (docs/METHOD.md §3)."""
    ids = planned.request.ids
    sample_ids = np.concatenate([r.ids for r in results])
    sq = np.concatenate([r.stat_values for r in results]) ** 2 * variance_scale
    # each sample's row in the batch by binary search over the sorted ids (no per-id dict)
    order = np.argsort(ids, kind="stable")
    rows = order[np.searchsorted(ids, sample_ids, sorter=order)]
    per_point = np.bincount(rows, weights=sq, minlength=len(ids))
    counts = planned.allocation.counts
    return float(np.sum(per_point / counts**2) / len(counts) ** 2)
