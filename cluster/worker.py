"""QueryWorker: a model replica that evaluates shards, replays every update, and (as
rank 0) evaluates splits and writes checkpoints — the driver holds no model.

It builds its replica from the config (nothing pickled per step), evaluates shards of
(datapoint, query-seed) work, and applies each step's update itself through the same
``fqa.step.ReplicaUpdater`` as the single-process trainer: spsa results are per-query
scalars, so after start-up no parameters cross the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from fqa.checkpoint import load_checkpoint, save_checkpoint
from fqa.config import Config
from fqa.estimators import Shard, ShardResult, Update
from fqa.setup import build_estimator, build_optimizer, build_task
from fqa.stats import DatapointStats
from fqa.step import ReplicaUpdater, UpdateOutcome


def parameter_checksum(params: list[torch.Tensor]) -> str:
    """sha256 of the trainable parameters' bytes: replicas agree iff bit-identical."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class QueryWorker:
    def __init__(self, config_json: str, threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        self.config = Config.model_validate_json(config_json)
        self.duplicates = 0
        self._build()

    def _build(self) -> None:
        """The replica as the config creates it: the state at step 0 of a fresh run."""
        self.task = build_task(self.config)
        self.estimator = build_estimator(self.config, self.task)
        self.params = [p for _, p in self.task.trainable_parameters()]
        self.optimizer = build_optimizer(self.config, self.params)
        self.updater = ReplicaUpdater(self.config, self.task, self.estimator, self.optimizer)
        # idempotency key of the updates: a replayed or retried apply() for a step this
        # replica already holds is ignored (None: unknown, accept the next one)
        self.applied_step: int | None = None
        self.outcome: UpdateOutcome | None = None  # of the last update applied

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        """What the driver needs to plan, in place of a model of its own."""
        return {
            "train_ids": self.task.train_ids(),
            "variance_scale": self.estimator.variance_scale(self.task),
            "primary_metric": getattr(self.task, "primary_metric", "accuracy"),
        }

    def load_replica(self, state: dict[str, Any], step: int) -> str:
        """Resynchronise (restart without a usable log, checksum mismatch) from another
        worker's ``state()``, which holds every update before ``step``."""
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.applied_step = step - 1
        return self.checksum()

    def read_state(self, checkpoint: str) -> dict[str, Any]:
        """A checkpoint's state.json, after verifying every file's checksum."""
        return load_checkpoint(Path(checkpoint)).state

    def restore(
        self, checkpoint: str | None, updates: list[tuple[Any, ...]]
    ) -> tuple[str, UpdateOutcome | None]:
        """Rebuild: the checkpoint on the storage path (None: the config's initial
        replica), then the updates since (each ``apply``'s arguments, as the driver
        broadcast them). Returns the checksum and the last update's outcome."""
        if checkpoint is None:
            self._build()
            self.applied_step = -1
        else:
            data = load_checkpoint(Path(checkpoint))
            self.task.model.load_state_dict(data.model)
            self.optimizer.load_state_dict(data.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            self.applied_step = int(data.state["step"]) - 1
        for step, update, prepass_nonfinite in updates:
            self.apply(step, update, prepass_nonfinite)
        return self.checksum(), self.outcome

    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.task.prepass(np.array(ids))  # a writable copy of the object-store array

    def evaluate(self, shard: Shard) -> ShardResult:
        writable = dataclasses.replace(shard, ids=np.array(shard.ids))  # see prepass
        return self.estimator.evaluate_exactly(self.task, writable)

    def apply(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome | None:
        if self.applied_step is not None and step <= self.applied_step:
            self.duplicates += 1  # a retried or replayed delivery: already in the replica
            return None
        self.applied_step = step
        self.outcome = self.updater.apply(step, update, prepass_nonfinite)
        return self.outcome

    def last_outcome(self) -> UpdateOutcome | None:
        return self.outcome

    def evaluate_split(self, split: str) -> dict[str, float]:
        return self.task.evaluate(split)

    def save_checkpoint(
        self, directory: str, step: int, stats: DatapointStats, state: dict[str, Any]
    ) -> str:
        """Rank 0's checkpoint of its replica, in fqa.checkpoint's atomic format."""
        if self.applied_step is not None and self.applied_step != step - 1:
            raise RuntimeError(
                f"checkpoint of step {step} asked of a replica at step {self.applied_step + 1}"
            )
        path = save_checkpoint(Path(directory), step, self.task.model, self.optimizer, stats, state)
        return str(path)

    def checksum(self) -> str:
        return parameter_checksum(self.params)

    def parameters(self) -> torch.Tensor:
        """The trainable parameters flattened on the host (tests and checks only)."""
        return torch.cat([p.detach().cpu().flatten() for p in self.params])

    def state(self) -> dict[str, Any]:
        # host tensors: the receiving replica may sit on another device
        model = {k: v.detach().cpu() for k, v in self.task.model.state_dict().items()}
        return {"model": model, "optimizer": self.optimizer.state_dict()}


def remote_worker_class(cpus: float, gpus: float, max_restarts: int):
    """The actor class with this run's resources (a restarted actor reruns __init__)."""
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts)(QueryWorker)
