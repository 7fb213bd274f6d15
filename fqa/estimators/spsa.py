"""Weight perturbation (SPSA / MeZO style): two loss-only queries per sample.

p = (l(θ+εu) − l(θ−εu)) / 2ε, ĝ = p·u, with Rademacher directions u ∈ {−1, +1}^D
regenerated from the direction's seed by an integer hash (fqa/noise.py) whenever they
are needed — to perturb and to build the gradient — so they are never stored or sent,
and a worker's result is (seed, id, p): a few bytes per query.

θ itself is never modified: while a module runs, its parameters are swapped for a
perturbed copy (θ ± εu, one module at a time) and swapped back afterwards, so the
restore is exact by construction and the only extra memory is one module's weights.

All datapoints whose count exceeds k share direction k (one perturbed model, one
batched forward per shard), which is what makes a query as cheap as inference.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fqa.device import resolution
from fqa.estimators import ESTIMATORS
from fqa.estimators.base import (
    Estimator,
    Shard,
    ShardResult,
    Update,
    batch_weights,
    check_weighting,
    chunks,
    zero_grads,
)
from fqa.noise import DirectionBits, parameter_key, perturbed
from fqa.seeding import derive_seed
from fqa.tasks.base import Task


def _owners(task: Task) -> list[tuple[nn.Module, str, int]]:
    """(owning module, attribute, stream index) of every trainable parameter."""
    owners = []
    for index, (name, _) in enumerate(task.trainable_parameters()):
        path, _, attr = name.rpartition(".")
        owners.append((task.model.get_submodule(path), attr, index))
    return owners


class PerturbedModel:
    """During a query the model computes with θ + scale·u(seed); θ is never written.

    Each owning module's trainable parameters are replaced (in ``module._parameters``)
    by a perturbed copy from its forward pre-hook and put back by its forward hook.
    Parameters whose module is never called are swapped for the whole query instead
    (``whole``: e.g. a prompt context the task reads directly) or, when the enclosing
    owner's forward reads them (nn.MultiheadAttention's ``out_proj``), together with
    that owner — kept only if a query proves it bit-identical to the whole-query swap.
    A query in which some owner did not run is repeated (and counted), so the result
    never depends on which path a parameter took."""

    def __init__(self, task: Task, whole: set[str]) -> None:
        self.model = task.model
        self.by_owner: dict[nn.Module, list[tuple[str, int]]] = {}
        for owner, attr, index in _owners(task):
            self.by_owner.setdefault(owner, []).append((attr, index))
        self.names = {module: name for name, module in task.model.named_modules()}
        self.whole = whole  # owner names swapped for the whole query (shared cache)
        self.seed, self.scale = 0, 0.0
        self.depth: dict[nn.Module, int] = {}
        self.fired: set[nn.Module] = set()
        self.originals: dict[tuple[nn.Module, str], nn.Parameter] = {}
        self.params = [p for _, p in task.trainable_parameters()]
        self.bits: DirectionBits | None = None  # small parameters' bits, per direction
        # owners read inside an enclosing owner's forward without running themselves,
        # swapped with it (host -> guests)
        self.guests: dict[nn.Module, list[nn.Module]] = {}
        self.repeated_rows = 0  # queries spent learning which owners are silent (counted)

    def _swap(self, owner: nn.Module) -> None:
        for guest in (owner, *self.guests.get(owner, ())):
            for attr, index in self.by_owner[guest]:
                original = guest._parameters[attr]
                self.originals[(guest, attr)] = original
                guest._parameters[attr] = perturbed(
                    original, parameter_key(self.seed, index), self.scale, self.bits.bits.get(index)
                )

    def _restore(self, owner: nn.Module) -> None:
        for guest in (owner, *self.guests.get(owner, ())):
            for attr, _ in self.by_owner[guest]:
                original = self.originals.pop((guest, attr), None)
                if original is not None:
                    guest._parameters[attr] = original

    def _pre(self, owner: nn.Module, _inputs) -> None:
        self.fired.add(owner)
        self.depth[owner] = self.depth.get(owner, 0) + 1
        if self.depth[owner] == 1:
            self._swap(owner)

    def _post(self, owner: nn.Module, _inputs, _output) -> None:
        self.depth[owner] -= 1
        if self.depth[owner] == 0:
            self._restore(owner)

    def _run(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, set[nn.Module]]:
        """One query; returns the losses and the hooked owners that never ran."""
        guests = {g for group in self.guests.values() for g in group}
        hooked = [o for o in self.by_owner if self.names[o] not in self.whole and o not in guests]
        handles = [o.register_forward_pre_hook(self._pre) for o in hooked]
        handles += [o.register_forward_hook(self._post, always_call=True) for o in hooked]
        self.fired.clear()
        try:
            for owner in self.by_owner:
                if self.names[owner] in self.whole:
                    self._swap(owner)
            losses = run()
        finally:
            for handle in handles:
                handle.remove()
            for owner in self.by_owner:
                self._restore(owner)
            self.depth.clear()
        return losses, {o for o in hooked if o not in self.fired}

    def _host(self, silent: nn.Module) -> nn.Module | None:
        """The nearest enclosing owner that ran: e.g. nn.MultiheadAttention, whose
        forward reads its ``out_proj`` Linear's weights without calling it."""
        name = self.names[silent]
        while "." in name:
            name = name.rpartition(".")[0]
            module = self.model.get_submodule(name)
            if module in self.by_owner and module in self.fired:
                return module
        return None

    def query(self, seed: int, scale: float, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` (the task's losses) with θ + scale·u(seed); θ exact afterwards."""
        self.seed, self.scale = seed, scale
        if self.bits is None or self.bits.seed != seed:  # reused by θ+εu and θ−εu
            self.bits = DirectionBits(seed, self.params)
        losses, silent = self._run(run)
        if not silent:
            return losses
        # some parameters were read without their module running: repeat the query with
        # them swapped throughout (always right), then try swapping each only during
        # its enclosing owner's forward (keeps one module's copy alive, not all of
        # them) and keep that only if the query comes out bit-identical
        hosts = {o: self._host(o) for o in silent}
        self.whole |= {self.names[o] for o in silent}
        reference, _ = self._run(run)
        self.repeated_rows += len(losses)  # the repeats are real queries: counted
        adoptable = {o: h for o, h in hosts.items() if h is not None}
        if adoptable:
            self.whole -= {self.names[o] for o in adoptable}
            for guest, host in adoptable.items():
                self.guests.setdefault(host, []).append(guest)
            trial, still_silent = self._run(run)
            self.repeated_rows += len(losses)
            if still_silent or not torch.equal(trial, reference):
                for guest, host in adoptable.items():
                    self.guests[host].remove(guest)
                self.whole |= {self.names[o] for o in adoptable}
        return reference


@ESTIMATORS.register("spsa")
class SPSAEstimator(Estimator):
    name = "spsa"
    queries_per_sample = 2  # central difference: θ+εu and θ−εu

    def __init__(self, epsilon: float = 1e-3, weighting: str = "unbiased", **_ignored) -> None:
        if not epsilon > 0:
            raise ValueError(f"estimator.epsilon={epsilon} must be > 0 (typical: 1e-3)")
        self.epsilon = epsilon
        self.weighting = check_weighting(weighting)
        # per model: its hooks' bookkeeping, owners swapped for the whole query, the
        # current direction's small-parameter bits (shards of a direction are consecutive)
        self._perturbed: weakref.WeakKeyDictionary[nn.Module, PerturbedModel] = (
            weakref.WeakKeyDictionary()
        )
        self._checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def plan(self, ids, counts, baselines, seed, shard_rows):
        counts = np.asarray(counts)
        weights = batch_weights(counts, self.weighting)
        shards = []
        for k in range(int(counts.max())):
            active = np.flatnonzero(counts > k)
            direction_seed = derive_seed(seed, "direction", k)
            for part in chunks(len(active), shard_rows):
                rows = active[part]
                shards.append(Shard(direction_seed, ids[rows], weights[rows], baselines[rows]))
        return shards

    def check(self, task: Task) -> None:
        """ε against the compute dtype's spacing at the weights' scale: the forward casts
        θ ± εu to that dtype, and a smaller ε would round back to θ."""
        if task.model in self._checked:
            return
        dtype = task.placement.compute_dtype
        params = [p.detach() for _, p in task.trainable_parameters()]
        rms = float(
            torch.sqrt(sum((p.double() ** 2).sum() for p in params) / self._dimension(task))
        )
        floor = resolution(dtype) * rms
        if self.epsilon < floor:
            raise ValueError(
                f"estimator.epsilon={self.epsilon} is below the {task.placement.precision} "
                f"resolution of the trainable weights (rms {rms:.3g}: spacing about {floor:.2g}), "
                f"so θ ± εu would round back to θ; use estimator.epsilon >= {floor:.2g} or "
                "run.precision: fp32"
            )
        self._checked[task.model] = True

    def evaluate(self, task: Task, shard: Shard) -> ShardResult:
        self.check(task)
        model = self._perturbed.get(task.model)
        if model is None:
            model = PerturbedModel(task, set())
            self._perturbed[task.model] = model
        eps = self.epsilon
        repeated = model.repeated_rows
        loss_plus = model.query(shard.seed, eps, lambda: task.losses(shard.ids)).double()
        loss_minus = model.query(shard.seed, -eps, lambda: task.losses(shard.ids)).double()
        projected = ((loss_plus - loss_minus) / (2 * eps)).cpu().numpy()  # one host copy
        bad = ~np.isfinite(projected)
        projected = np.where(bad, 0.0, projected)
        return ShardResult(
            seed=shard.seed,
            ids=shard.ids,
            values=projected,
            stat_values=projected,
            queries=2 * len(shard) + model.repeated_rows - repeated,
            nonfinite=int(bad.sum()),
        )

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
        """ĝ = Σ_k c_k u_k, each direction regenerated from its seed on the grad's device."""
        zero_grads(task)
        grads = [p.grad for _, p in task.trainable_parameters()]
        for seed, coefficient in update.coefficients.items():
            bits = DirectionBits(seed, grads)
            for index, grad in enumerate(grads):
                bits.add_(grad, index, coefficient)

    def variance_scale(self, task: Task) -> float:
        """E‖ĝ − g‖² = (D − 1)·E[p²] for u ∈ {−1, +1}^D (docs/METHOD.md §7)."""
        return float(max(self._dimension(task) - 1, 1))

    @staticmethod
    def _dimension(task: Task) -> int:
        return sum(p.numel() for _, p in task.trainable_parameters())
