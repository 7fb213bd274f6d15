"""Weight perturbation (SPSA / MeZO style): two loss-only queries per sample.

p = (l(θ+εu) − l(θ−εu)) / 2ε, ĝ = p·u. The direction u is regenerated from its seed
whenever it is needed — to perturb, to restore, to build the gradient — so it is never
stored or sent, and a worker's result is (seed, id, p): a few bytes per query.

All datapoints whose count exceeds k share direction k (one perturbed model, one
batched forward per shard), which is what makes a query as cheap as inference.
"""

from __future__ import annotations

import numpy as np
import torch

from fqa.estimators import ESTIMATORS
from fqa.estimators.base import (
    Estimator,
    Shard,
    ShardResult,
    Update,
    batch_weights,
    chunks,
    zero_grads,
)
from fqa.seeding import derive_seed
from fqa.tasks.base import Task


def perturb_(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """θ += scale·u(seed), in place, regenerating u parameter by parameter."""
    generator = None
    for param in params:
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        noise = torch.randn(
            param.shape, generator=generator, device=param.device, dtype=param.dtype
        )
        param.data.add_(noise, alpha=scale)


@ESTIMATORS.register("spsa")
class SPSAEstimator(Estimator):
    name = "spsa"
    queries_per_sample = 2  # central difference: θ+εu and θ−εu

    def __init__(self, epsilon: float = 1e-3, **_ignored) -> None:
        if not epsilon > 0:
            raise ValueError(f"estimator.epsilon={epsilon} must be > 0 (typical: 1e-3)")
        self.epsilon = epsilon

    def plan(self, ids, counts, baselines, seed, shard_rows):
        counts = np.asarray(counts)
        weights = batch_weights(counts)
        shards = []
        for k in range(int(counts.max())):
            active = np.flatnonzero(counts > k)
            direction_seed = derive_seed(seed, "direction", k)
            for part in chunks(len(active), shard_rows):
                rows = active[part]
                shards.append(Shard(direction_seed, ids[rows], weights[rows], baselines[rows]))
        return shards

    def evaluate(self, task: Task, shard: Shard) -> ShardResult:
        params = [p for _, p in task.trainable_parameters()]
        eps = self.epsilon
        offset = 0.0  # how far θ currently is from its true value, in units of u
        try:
            perturb_(params, shard.seed, eps)
            offset = eps
            loss_plus = task.losses(shard.ids).double()
            perturb_(params, shard.seed, -2 * eps)
            offset = -eps
            loss_minus = task.losses(shard.ids).double()
        finally:
            if offset:
                perturb_(params, shard.seed, -offset)  # restore θ even if a query raised
        projected = ((loss_plus - loss_minus) / (2 * eps)).numpy()
        bad = ~np.isfinite(projected)
        projected = np.where(bad, 0.0, projected)
        return ShardResult(
            seed=shard.seed,
            ids=shard.ids,
            values=projected,
            stat_values=projected,
            queries=2 * len(shard),
            nonfinite=int(bad.sum()),
        )

    def evaluate_exactly(self, task: Task, shard: Shard) -> ShardResult:
        # θ+εu−2εu+εu leaves float round-off that depends on which shards a replica
        # happened to evaluate; restoring the saved bytes keeps replicas bit-identical
        params = [p for _, p in task.trainable_parameters()]
        saved = [p.detach().clone() for p in params]
        try:
            return self.evaluate(task, shard)
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved, strict=True):
                    param.copy_(value)

    def reduce(self, shards: list[Shard], results: list[ShardResult]) -> Update:
        """c_k = Σ over direction k's samples of p·1/(B·n_i), summed in plan order."""
        coefficients: dict[int, float] = {}
        for shard, result in zip(shards, results, strict=True):
            coefficients[shard.seed] = coefficients.get(shard.seed, 0.0) + float(
                np.dot(result.values, shard.weights)
            )
        return Update(
            coefficients=coefficients,
            queries=sum(r.queries for r in results),
            nonfinite=sum(r.nonfinite for r in results),
        )

    def write_grad(self, task: Task, update: Update) -> None:
        """ĝ = Σ_k c_k u_k, each direction regenerated from its seed."""
        zero_grads(task)
        grads = [p.grad for _, p in task.trainable_parameters()]
        for seed, coefficient in update.coefficients.items():
            perturb_(grads, seed, coefficient)

    def variance_scale(self, task: Task) -> float:
        return float(sum(p.numel() for _, p in task.trainable_parameters()) + 1)
