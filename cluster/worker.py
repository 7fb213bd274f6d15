"""QueryWorker: a model replica that evaluates shards and replays every update.

It builds its replica from the config (nothing pickled per step), evaluates shards of
(datapoint, query-seed) work, and applies each step's update itself through the same
``fqa.step.ReplicaUpdater`` as the single-process trainer: spsa results are per-query
scalars, so after start-up no parameters cross the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import ray
import torch

from fqa.checkpoint import load_checkpoint
from fqa.config import Config
from fqa.estimators import Shard, ShardResult, Update
from fqa.setup import build_estimator, build_optimizer, build_task
from fqa.step import ReplicaUpdater, UpdateOutcome
from fqa.storage import location


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
        self.task = build_task(self.config)
        self.estimator = build_estimator(self.config, self.task)
        self.params = [p for _, p in self.task.trainable_parameters()]
        self.optimizer = build_optimizer(self.config, self.params)
        self.updater = ReplicaUpdater(self.config, self.task, self.estimator, self.optimizer)
        # idempotency key of the updates: a replayed or retried apply() for a step this
        # replica already holds is ignored (None: unknown, accept the next one)
        self.applied_step: int | None = None
        self.duplicates = 0

    def ready(self) -> bool:
        return True

    def variance_scale(self) -> float:
        return self.estimator.variance_scale(self.task)

    def load_state(
        self, model_state: dict[str, torch.Tensor], optimizer_state: dict, step: int | None = None
    ) -> None:
        """Resynchronise (start-up, restart, checksum mismatch) from the driver's replica,
        which holds every update before ``step``."""
        self.task.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.optimizer.zero_grad(set_to_none=True)
        self.applied_step = None if step is None else step - 1

    def restore(self, checkpoint: str, updates: list[tuple[Any, ...]]) -> str:
        """Rebuild after a restart: the checkpoint on the storage path, then the updates
        since (each ``apply``'s arguments, as the driver broadcast them). Returns the
        checksum, which the driver compares with its own replica's."""
        data = load_checkpoint(location(checkpoint))
        self.load_state(data.model, data.optimizer, int(data.state["step"]))
        for step, update, prepass_nonfinite in updates:
            self.apply(step, update, prepass_nonfinite)
        return self.checksum()

    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.task.prepass(np.array(ids))  # a writable copy of the object-store array

    def evaluate(self, shard: Shard) -> ShardResult:
        # spsa perturbs θ in place and subtracts the perturbation again, which leaves
        # float round-off that depends on which shards a replica happened to evaluate;
        # restoring the exact bytes keeps every replica bit-identical to the driver's.
        saved = [p.detach().clone() for p in self.params] if self.estimator.name == "spsa" else []
        try:
            writable = dataclasses.replace(shard, ids=np.array(shard.ids))  # see prepass
            result = self.estimator.evaluate(self.task, writable)
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=False):
                    param.copy_(value)
        if self.estimator.name == "spsa":
            # (seed, ids, p) is all the update needs; stat_values is p itself (one array)
            result.stat_values = result.values
        return result

    def apply(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome | None:
        if self.applied_step is not None and step <= self.applied_step:
            self.duplicates += 1  # a retried or replayed delivery: already in the replica
            return None
        self.applied_step = step
        return self.updater.apply(step, update, prepass_nonfinite)

    def checksum(self) -> str:
        return parameter_checksum(self.params)

    def state(self) -> dict[str, Any]:
        return {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def remote_worker_class(cpus: float, gpus: float, max_restarts: int):
    """The actor class with this run's resources (a restarted actor reruns __init__)."""
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts)(QueryWorker)
