"""The estimator contract: plan a step's queries into shards, evaluate shards, write ``.grad``.

A step is planned as a list of :class:`Shard` s — the unit a worker evaluates — whose
cut depends only on the allocation and ``shard_rows``, never on how many processes run
them, so the single-process trainer and the cluster produce the same estimate.

Batch estimator (docs/METHOD.md §3): every sample of datapoint i carries the weight
1/(B·n_i), so each datapoint's estimate is divided by its own sample count. The
``count`` weighting (1/N for every sample) exists only to reproduce the FLOPS authors'
code, which repeats rows and averages: biased towards datapoints given more queries.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from fqa.exact_sum import Collective
from fqa.tasks.base import Task

log = logging.getLogger(__name__)

WEIGHTINGS = ("unbiased", "count")


@dataclass(frozen=True)
class Shard:
    seed: int  # spsa: the direction's seed (shared by the shards of one direction); lr: noise seed
    ids: np.ndarray  # int64 [r]: global datapoint id of each sample
    weights: np.ndarray  # float64 [r]: 1/(B·n_i), the batch-estimator weight of the sample
    baselines: np.ndarray  # float64 [r]: the datapoint's unperturbed pre-pass loss

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ShardResult:
    """What a shard sends back: small, typed, independent of model size for spsa."""

    seed: int
    ids: np.ndarray  # int64 [r]: datapoint of each sample
    values: np.ndarray  # float64 [r]: spsa: projected derivative p; lr: mean (loss − baseline)
    stat_values: np.ndarray  # float64 [r]: the scalar whose second moment tracks v_i
    queries: int  # forward evaluations of one datapoint spent on this shard
    nonfinite: int  # samples whose loss was NaN/inf (their contribution is zeroed)
    grads: dict[str, torch.Tensor] | None = field(default=None)  # lr: weighted partial sums
    # lr on the cluster: ``grads`` stayed on the worker that evaluated the shard, and the
    # workers finish the sum among themselves (Estimator.finish); only scalars came back
    grads_held: bool = False


@dataclass
class Update:
    """One step's estimate reduced to what every replica needs to write ``.grad``.

    spsa: the coefficient of each direction (seed -> Σ p·1/(B·n_i)), a few bytes per
    direction; lr: the summed gradient tensors (on the host) — or, when the shards'
    partial sums stayed on the workers, the step's shards (``pending``), from which each
    replica finishes the sum (:meth:`Estimator.finish`). Built by
    :meth:`Estimator.reduce` and consumed by :meth:`Estimator.write_grad`."""

    coefficients: dict[int, float] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: list[Shard] = field(default_factory=list)  # shards whose sums are still apart
    queries: int = 0  # perturbed queries behind the update
    nonfinite: int = 0  # samples whose loss was NaN/inf (their contribution is zeroed)

    @property
    def nbytes(self) -> int:
        return 16 * len(self.coefficients) + sum(g.nbytes for g in self.grads.values())


class Estimator(ABC):
    name: str = "base"
    queries_per_sample: int = 1

    @abstractmethod
    def plan(
        self, ids: np.ndarray, counts: np.ndarray, baselines: np.ndarray, seed: int, shard_rows: int
    ) -> list[Shard]:
        """Cut the batch's samples (counts[i] for datapoint ids[i]) into shards."""

    def check(self, task: Task) -> None:
        """Refuse settings the task's device/precision cannot honour (before any work)."""
        return None  # nothing to check by default

    @abstractmethod
    def evaluate(self, task: Task, shard: Shard) -> ShardResult:
        """Spend the shard's queries on the task's current parameters (restored afterwards)."""

    @abstractmethod
    def reduce(self, shards: list[Shard], results: list[ShardResult]) -> Update:
        """Shard results (in plan order) -> the step's update; pure, needs no model."""

    @abstractmethod
    def write_grad(self, task: Task, update: Update) -> None:
        """Write the update into ``param.grad`` of the task's trainable parameters."""

    def finish(
        self,
        task: Task,
        update: Update,
        held: dict[int, dict[str, torch.Tensor]],
        collective: Collective | None = None,
    ) -> None:
        """Complete ``update.grads`` from partial sums that stayed with the replicas:
        ``held`` (shard index -> sums) from this replica's evaluations, the others'
        through ``collective``; without one, every pending shard not held is evaluated
        here (a rebuilt replica replaying a step alone). Nothing to do by default."""
        if update.pending:
            raise NotImplementedError(f"the {self.name} estimator leaves no partial sums apart")

    def prepare(self, task: Task) -> None:
        """Get the task's model ready for this estimator (once, before its optimizer is built)."""
        return None  # most estimators train the task's trainable parameters as they are

    def evaluate_exactly(self, task: Task, shard: Shard) -> ShardResult:
        """``evaluate``, leaving the parameters bit-identical afterwards: what replicas
        that must agree bit for bit call (an estimator that never touches the
        parameters needs nothing more)."""
        return self.evaluate(task, shard)

    def estimate(self, task: Task, shards: list[Shard]) -> Update:
        """Evaluate every shard here and reduce: the single-process path (and tests)."""
        update = self.reduce(shards, [self.evaluate(task, shard) for shard in shards])
        self.write_grad(task, update)
        return update

    def variance_scale(self, task: Task) -> float:
        """Factor turning E[stat_value²] into v_i (a common scale; allocators ignore it)."""
        return 1.0


def batch_weights(counts: np.ndarray, weighting: str = "unbiased") -> np.ndarray:
    """Weight of one sample of datapoint i: 1/(B·n_i) (``unbiased``), or 1/Σn for every
    sample (``count``: datapoint i weighted by n_i/Σn, a biased estimate)."""
    counts = np.asarray(counts, dtype=np.float64)
    if np.any(counts < 1):
        raise ValueError("every datapoint of the batch needs at least one sample (n_i >= 1)")
    if weighting == "count":
        return np.full(len(counts), 1.0 / counts.sum())
    return 1.0 / (len(counts) * counts)


_warned_count: list[bool] = []


def check_weighting(weighting: str) -> str:
    """Validate ``estimator.weighting``; choosing the biased ``count`` is logged loudly."""
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"estimator.weighting={weighting!r} is not one of {list(WEIGHTINGS)}; "
            "use 'unbiased' (the estimator) or 'count' (the biased ablation)"
        )
    if weighting == "count" and not _warned_count:
        _warned_count.append(True)  # once per process: every trainer and worker checks it
        log.warning(
            "estimator.weighting=count: every sample weighted alike, so datapoint i counts "
            "n_i times — a BIASED gradient (the FLOPS authors' code), for ablations only"
        )
    return weighting


def chunks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def zero_grads(task: Task) -> None:
    for _, param in task.trainable_parameters():
        param.grad = torch.zeros_like(param)
