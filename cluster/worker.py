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
from typing import Any

import numpy as np
import ray
import torch

from cluster.collective import CollectiveError, WorkerGroup, host_store
from fqa.checkpoint import load_checkpoint, save_checkpoint
from fqa.config import Config
from fqa.estimators import Shard, ShardResult, Update
from fqa.setup import build_estimator, build_optimizer, build_task
from fqa.stats import DatapointStats
from fqa.step import ReplicaUpdater, UpdateOutcome
from fqa.storage import location


class ReplicaBehind(RuntimeError):
    """Work for a step this replica has not reached: Ray restarted it unnoticed (its
    fresh instance holds the config's initial state); the driver rebuilds it."""


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
        # replica already holds is ignored; -1 is the config's initial replica (which a
        # restarted actor also reports, so the driver can tell it was restarted)
        self.applied_step = -1
        self.outcome: UpdateOutcome | None = None  # of the last update applied
        # lr: each evaluated shard's partial gradient sums, by (step, shard index), kept
        # here until the step's update is applied (the workers add them among themselves)
        self.partials: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.group: WorkerGroup | None = None
        self._store = None  # rank 0: the rendezvous store of the current group

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        """What the driver needs to plan, in place of a model of its own."""
        return {
            "train_ids": self.task.train_ids(),
            "variance_scale": self.estimator.variance_scale(self.task),
            "primary_metric": getattr(self.task, "primary_metric", "accuracy"),
            "trainable_count": sum(p.numel() for p in self.params),
        }

    def load_replica(self, state: dict[str, Any], step: int) -> str:
        """Resynchronise (restart without a usable log, checksum mismatch) from another
        worker's ``state()``, which holds every update before ``step``."""
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.applied_step = step - 1
        self.partials = {}
        return self.checksum()

    def read_state(self, checkpoint: str) -> dict[str, Any]:
        """A checkpoint's state.json, after verifying every file's checksum."""
        return load_checkpoint(location(checkpoint)).state

    def restore(
        self, checkpoint: str | None, updates: list[tuple[Any, ...]]
    ) -> tuple[str, UpdateOutcome | None]:
        """Rebuild: the checkpoint on the storage path (None: the config's initial
        replica), then the updates since (each ``apply``'s arguments, as the driver
        broadcast them). Returns the checksum and the last update's outcome."""
        if checkpoint is None:
            self._build()
        else:
            data = load_checkpoint(location(checkpoint))
            self.task.model.load_state_dict(data.model)
            self.optimizer.load_state_dict(data.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            self.applied_step = int(data.state["step"]) - 1
            self.partials = {}
        for step, update, prepass_nonfinite in updates:
            self.apply(step, update, prepass_nonfinite)
        return self.checksum(), self.outcome

    def _at(self, step: int) -> None:
        if self.applied_step != step - 1:
            raise ReplicaBehind(
                f"step {step} asked of a replica that holds step {self.applied_step + 1}"
            )

    def prepass(self, ids: np.ndarray, step: int) -> dict[str, np.ndarray]:
        self._at(step)
        return self.task.prepass(np.array(ids))  # a writable copy of the object-store array

    def evaluate(self, shard: Shard, step: int, index: int) -> ShardResult:
        """The shard's result; tensors it carries (lr's partial sums) stay here, keyed
        by (step, shard index), and only the scalars go back."""
        self._at(step)
        writable = dataclasses.replace(shard, ids=np.array(shard.ids))  # see prepass
        result = self.estimator.evaluate_exactly(self.task, writable)
        if result.grads is None:
            return result
        self.partials[(step, index)] = result.grads
        return dataclasses.replace(result, grads=None, grads_held=True)

    def open_group(self, epoch: int, size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: a rendezvous store for group ``epoch``; returns its address."""
        self._store = host_store(size, timeout_s)
        return ray.util.get_node_ip_address(), self._store.port

    def join_group(
        self, epoch: int, rank: int, size: int, host: str, port: int, timeout_s: float
    ) -> int:
        """Form group ``epoch`` with the other members (blocks until all have joined)."""
        self.group = None
        store = self._store if rank == 0 else None
        self.group = WorkerGroup(epoch, rank, size, host, port, timeout_s, store)
        return epoch

    def apply(
        self,
        step: int,
        update: Update,
        prepass_nonfinite: int,
        mine: list[int] | None = None,
        epoch: int | None = None,
    ) -> UpdateOutcome | None:
        """Apply ``update``. If its partial sums stayed on the workers, they are added
        first: this replica's (``mine``) with the others' over group ``epoch``, or, with
        no group (a rebuilt replica replaying the step), all evaluated here."""
        if step <= self.applied_step:
            self.duplicates += 1  # a retried or replayed delivery: already in the replica
            return None
        self._at(step)  # updates are applied in order, each once
        if update.pending:
            collective, held = None, {}
            if mine is not None:
                if self.group is None or self.group.epoch != epoch:
                    raise CollectiveError(f"step {step}: this worker is not in group epoch {epoch}")
                missing = [j for j in mine if (step, j) not in self.partials]
                if missing:
                    raise ReplicaBehind(f"step {step}: the sums of shards {missing} are not here")
                collective, held = self.group, {j: self.partials[(step, j)] for j in mine}
            self.estimator.finish(self.task, update, held, collective)
        self.partials = {key: value for key, value in self.partials.items() if key[0] > step}
        self.applied_step = step
        self.outcome = self.updater.apply(step, update, prepass_nonfinite)
        return self.outcome

    def last_outcome(self) -> UpdateOutcome | None:
        return self.outcome

    def evaluate_split(self, split: str, step: int) -> dict[str, float]:
        self._at(step)
        return self.task.evaluate(split)

    def save_checkpoint(
        self, directory: str, step: int, stats: DatapointStats, state: dict[str, Any]
    ) -> str:
        """Rank 0's checkpoint of its replica, in fqa.checkpoint's atomic format."""
        self._at(step)
        path = save_checkpoint(
            location(directory), step, self.task.model, self.optimizer, stats, state
        )
        return str(path)

    def checksum(self) -> str:
        return parameter_checksum(self.params)

    def replica(self) -> tuple[int, str]:
        """(the last step applied, the checksum): which state this replica holds."""
        return self.applied_step, self.checksum()

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
