"""Where a step's work runs: the Executor protocol that ``fqa.trainer.Trainer`` composes.

The trainer owns the loop, the plan and the bookkeeping; an executor owns the model
replicas and runs the pre-pass, the shards, the update, evaluation and checkpoint
writing on them. ``InProcessExecutor`` keeps one replica in this process (the
reference); the Ray worker pool (``cluster.driver.RayWorkerPool``) keeps one per
QueryWorker and none in the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fqa.checkpoint import load_checkpoint, save_checkpoint
from fqa.config import Config
from fqa.estimators import Estimator, Shard, ShardResult, Update
from fqa.setup import build_estimator, build_optimizer, build_task
from fqa.stats import DatapointStats
from fqa.step import ReplicaUpdater, UpdateOutcome


class Executor(Protocol):
    estimator: Estimator  # reduces shard results into an update (needs no model)

    def train_ids(self) -> np.ndarray: ...

    def variance_scale(self) -> float: ...

    def primary_metric(self) -> str: ...

    def prepass(self, step: int, ids: np.ndarray) -> dict[str, np.ndarray]: ...

    def evaluate(self, step: int, shards: list[Shard]) -> list[ShardResult]:
        """Results in plan order, each shard's exactly once."""

    def apply(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome:
        """Every replica writes the update into .grad and steps (or drops the step)."""

    def evaluate_split(self, split: str) -> dict[str, float]: ...

    def save_checkpoint(
        self, directory: Path, step: int, stats: DatapointStats, state: dict[str, Any]
    ) -> Path:
        """The replicas' model and optimizer plus ``stats``/``state``, in fqa.checkpoint's
        atomic, checksummed format; returns the checkpoint's path."""

    def restore(self, path: Path, check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Verify the checkpoint's checksums, pass its state.json (step, counters,
        allocator state, config) to ``check`` (which raises to refuse it), then load it
        into every replica; returns that state."""

    def step_metrics(self) -> dict[str, Any]:
        """Executor-specific metrics of the last step (empty in process)."""

    def summary(self) -> dict[str, Any]:
        """Executor-specific end-of-run figures (the pool verifies its replicas first)."""

    def close(self) -> None: ...


class InProcessExecutor:
    """One replica in this process; shards are evaluated one after another."""

    def __init__(self, config: Config, task=None) -> None:
        self.config = config
        self.task = task if task is not None else build_task(config)
        self.estimator = build_estimator(config, self.task)
        self.params = [p for _, p in self.task.trainable_parameters()]
        self.optimizer = build_optimizer(config, self.params)
        self.updater = ReplicaUpdater(config, self.task, self.estimator, self.optimizer)

    def train_ids(self) -> np.ndarray:
        return self.task.train_ids()

    def variance_scale(self) -> float:
        return self.estimator.variance_scale(self.task)

    def primary_metric(self) -> str:
        return getattr(self.task, "primary_metric", "accuracy")

    def prepass(self, step: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.task.prepass(ids)  # B queries: baselines, allocator input, train metrics

    def evaluate(self, step: int, shards: list[Shard]) -> list[ShardResult]:
        return [self.estimator.evaluate(self.task, shard) for shard in shards]

    def apply(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome:
        return self.updater.apply(step, update, prepass_nonfinite)

    def evaluate_split(self, split: str) -> dict[str, float]:
        return self.task.evaluate(split)

    def save_checkpoint(
        self, directory: Path, step: int, stats: DatapointStats, state: dict[str, Any]
    ) -> Path:
        return save_checkpoint(directory, step, self.task.model, self.optimizer, stats, state)

    def restore(self, path: Path, check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        data = load_checkpoint(path)
        check(data.state)
        self.task.model.load_state_dict(data.model)
        self.optimizer.load_state_dict(data.optimizer)
        return data.state

    def parameters(self) -> torch.Tensor:
        """The trainable parameters, flattened into one host tensor (tests, checks)."""
        return torch.cat([p.detach().cpu().flatten() for p in self.params])

    def step_metrics(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass  # the replica stays usable (tests and benchmarks read it after fit)
