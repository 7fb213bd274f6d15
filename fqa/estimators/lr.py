"""Likelihood-ratio estimator: Gaussian noise injected into layer outputs by forward hooks.

For a hooked layer y = Wx + b, the query adds σε to y; with the query's loss l and
the datapoint's unperturbed loss b_i as baseline,

    ∇_W ≈ (l − b_i)·(ε/σ)xᵀ,   ∇_b ≈ (l − b_i)·ε/σ     (summed over tokens)

Each trainable nn.Linear (optionally nn.Conv2d) gets its own noise in the same forward,
so one query estimates all layers at once. Samples are antithetic pairs (ε, −ε) by
default, in which case the baseline cancels and the pair is a central difference.
The gradient is accumulated as one matrix product per layer over the shard's rows.
"""

from __future__ import annotations

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
    chunks,
    zero_grads,
)
from fqa.noise import parameter_key
from fqa.seeding import derive_seed
from fqa.tasks.base import Task

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Noise and gradient products in fp32 when the forward runs in bf16 (autocast)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def layer_seed(seed: int, layer: int) -> int:
    """The noise seed of hooked layer ``layer`` in the shard ``seed``: one stream per layer."""
    k0, k1 = parameter_key(seed, layer)
    return (k0 << 31) ^ k1


def hooked_modules(model: nn.Module, include_conv: bool) -> list[tuple[str, nn.Module]]:
    """Linear (and Conv2d) modules that own a trainable parameter, in a fixed order."""
    kinds = (nn.Linear, nn.Conv2d) if include_conv else (nn.Linear,)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def unestimated_parameters(model: nn.Module, include_conv: bool) -> list[str]:
    """Trainable parameters outside hooked layers (LayerNorm, embeddings): LR cannot see them."""
    covered = {
        id(p)
        for _, module in hooked_modules(model, include_conv)
        for p in module.parameters(recurse=False)
    }
    return [
        name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered
    ]


class _NoiseInjector:
    """Forward hooks that add σε to each hooked layer's output and remember (x, ε)."""

    def __init__(self, modules, sigma: float, seed: int, pairs: int | None):
        self.sigma = sigma
        self.seed = seed
        self.layer = {id(module): index for index, (_, module) in enumerate(modules)}
        self.generators: dict[int, torch.Generator] = {}
        self.pairs = pairs  # antithetic: rows = [+ε for pairs] + [−ε for pairs]
        self.saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles = [module.register_forward_hook(self._hook) for _, module in modules]

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        in_place = not (torch.is_grad_enabled() and output.requires_grad)
        # each layer its own generator, seeded from (shard seed, layer), on this device:
        # reproducible per device type; never needs replaying elsewhere (docs/METHOD.md §7)
        generator = self.generators.get(id(module))
        if generator is None:
            generator = torch.Generator(device=output.device)
            generator.manual_seed(layer_seed(self.seed, self.layer[id(module)]))
            self.generators[id(module)] = generator
        dtype = _noise_dtype(output.dtype)
        if self.pairs is not None:
            # only the + half is kept: rows [:pairs] get +σε, rows [pairs:] get −σε
            noise = torch.randn(
                (self.pairs, *shape[1:]), generator=generator, device=output.device, dtype=dtype
            )
            if in_place:
                output[: self.pairs].add_(noise, alpha=self.sigma)
                output[self.pairs :].sub_(noise, alpha=self.sigma)
            else:
                output = output + (self.sigma * torch.cat([noise, -noise])).to(output.dtype)
        else:
            noise = torch.randn(shape, generator=generator, device=output.device, dtype=dtype)
            output = (
                output.add_(noise, alpha=self.sigma)
                if in_place
                else output + (self.sigma * noise).to(output.dtype)
            )
        self.saved.append((module, inputs[0], noise))
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _row_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _layer_gradient(
    module: nn.Module, x: torch.Tensor, weighted: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Σ_rows weighted_r-noise ⊗ x_r for one layer: the same FLOPs as its forward matmul."""
    grads = {}
    if isinstance(module, nn.Conv2d):
        if module.weight.requires_grad:
            grads["weight"] = torch.nn.grad.conv2d_weight(
                x,
                module.weight.shape,
                weighted,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
            )
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = weighted.sum(dim=(0, 2, 3))
        return grads
    flat_noise = weighted.reshape(-1, weighted.shape[-1])
    if module.weight.requires_grad:
        grads["weight"] = flat_noise.T @ x.reshape(-1, x.shape[-1])
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = flat_noise.sum(0)
    return grads


def _pair_gradient(
    module: nn.Module,
    x: torch.Tensor,
    half: torch.Tensor,
    coefficients,
) -> dict[str, torch.Tensor]:
    """Antithetic Σ_r c_r ε_r ⊗ x_r with ε = [half, −half]: Σ_p half_p ⊗ (c⁺_p x⁺_p − c⁻_p x⁻_p).

    One product of half the rows; exact because the gradient is bilinear in (noise, x).
    ``coefficients(dtype)`` gives (c⁺, c⁻, c⁺ − c⁻) in that dtype."""
    pairs = half.shape[0]
    grads = {}
    if module.weight.requires_grad:
        c_plus, c_minus, _ = coefficients(x.dtype)
        cp, cm = _row_view(c_plus, x), _row_view(c_minus, x)
        combined = torch.mul(x[:pairs], cp).addcmul_(x[pairs:], cm, value=-1).to(half.dtype)
        if isinstance(module, nn.Conv2d):
            grads["weight"] = torch.nn.grad.conv2d_weight(
                combined,
                module.weight.shape,
                half,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
            )
        else:
            grads["weight"] = half.reshape(-1, half.shape[-1]).T @ combined.reshape(
                -1, combined.shape[-1]
            )
    if module.bias is not None and module.bias.requires_grad:
        diff = coefficients(half.dtype)[2]
        if isinstance(module, nn.Conv2d):
            per_row = half.sum(dim=(2, 3))
        else:
            per_row = half.reshape(pairs, -1, half.shape[-1]).sum(1)
        grads["bias"] = diff @ per_row
    return grads


def _score_norm_sq(module: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """‖Σ_tokens ε_t x_tᵀ‖² (+ bias term) per row: the size of this layer's score."""
    if isinstance(module, nn.Conv2d) or noise.dim() == 2:
        sq = noise.flatten(1).pow(2).sum(1) * x.flatten(1).pow(2).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            sq = sq + noise.flatten(1).pow(2).sum(1)
        return sq
    rows = noise.shape[0]
    noise3, x3 = noise.reshape(rows, -1, noise.shape[-1]), x.reshape(rows, -1, x.shape[-1])
    # bmm with a contiguous right operand: far faster on CPU than a transposed view
    gram = torch.bmm(noise3, noise3.transpose(1, 2).contiguous())
    gram *= torch.bmm(x3, x3.transpose(1, 2).contiguous())
    sq = gram.sum((1, 2))
    if module.bias is not None and module.bias.requires_grad:
        sq = sq + noise3.sum(1).pow(2).sum(1)
    return sq


@ESTIMATORS.register("lr")
class LikelihoodRatioEstimator(Estimator):
    name = "lr"

    def __init__(
        self, sigma: float = 0.1, antithetic: bool = True, hook_conv: bool = False, **_ignored
    ):
        if not sigma > 0:
            raise ValueError(f"estimator.sigma={sigma} must be > 0 (typical: 0.01-0.5)")
        self.sigma = sigma
        self.antithetic = antithetic
        self.hook_conv = hook_conv
        self.queries_per_sample = 2 if antithetic else 1

    def plan(self, ids, counts, baselines, seed, shard_rows):
        counts = np.asarray(counts)
        rows = np.repeat(np.arange(len(ids)), counts)  # datapoint i's samples are contiguous
        weights = batch_weights(counts)[rows]
        return [
            Shard(
                derive_seed(seed, "queries", j),
                ids[rows[part]],
                weights[part],
                baselines[rows[part]],
            )
            for j, part in enumerate(chunks(len(rows), shard_rows))
        ]

    def check(self, task: Task) -> None:
        """σ against the compute dtype's resolution at the O(1) scale of normalised
        activations: below it, y + σε rounds back to y and the query measures nothing."""
        dtype = task.placement.compute_dtype
        if self.sigma < resolution(dtype):
            raise ValueError(
                f"estimator.sigma={self.sigma} is below the {task.placement.precision} "
                f"resolution ({resolution(dtype):.3g} at activations of size 1), so the noise "
                f"would round away; use estimator.sigma >= {resolution(dtype):.3g} or "
                "run.precision: fp32"
            )

    def evaluate(self, task: Task, shard: Shard) -> ShardResult:
        self.check(task)
        modules = hooked_modules(task.model, self.hook_conv)
        if not modules:
            raise ValueError(
                "the lr estimator found no trainable nn.Linear layer to inject noise into; "
                "train Linear layers (trainable.mode head/last_blocks/lora/full) or use spsa"
            )
        samples = len(shard)
        row_ids = np.concatenate([shard.ids, shard.ids]) if self.antithetic else shard.ids
        injector = _NoiseInjector(
            modules, self.sigma, shard.seed, samples if self.antithetic else None
        )
        try:
            losses = task.losses(row_ids).double()
        finally:
            injector.remove()
        baselines = torch.as_tensor(
            np.tile(shard.baselines, len(row_ids) // samples), device=losses.device
        )
        advantage = losses - baselines  # (l − b_i): O(σ), so the variance stays finite as σ → 0
        bad_rows = ~torch.isfinite(advantage)
        advantage = torch.where(bad_rows, torch.zeros_like(advantage), advantage)
        # per-row weight: 1/(B n_i) split over the rows of the sample, over σ
        row_weights = torch.as_tensor(
            np.tile(shard.weights, len(row_ids) // samples), device=losses.device
        )
        coefficient = advantage * row_weights / (self.sigma * (len(row_ids) // samples))

        grads: dict[str, torch.Tensor] = {}
        score_rows = samples  # antithetic: ε and −ε have the same score norm, so + rows only
        score_sq = torch.zeros(score_rows, dtype=torch.float64, device=losses.device)
        names = {id(module): name for name, module in modules}
        cast: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

        def coefficients(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
            if dtype not in cast:  # one conversion per dtype, not per layer
                c = coefficient.to(dtype)
                cast[dtype] = (
                    (
                        c[:samples],
                        c[samples:],
                        (coefficient[:samples] - coefficient[samples:]).to(dtype),
                    )
                    if self.antithetic
                    else (c,)
                )
            return cast[dtype]

        saved = injector.saved[::-1]
        injector.saved.clear()
        while saved:  # forward order; each layer's (x, ε) is freed once it is accumulated
            module, x, noise = saved.pop()
            x = x.to(_noise_dtype(x.dtype))  # fp32 products under bf16 autocast
            if self.antithetic:
                layer_grads = _pair_gradient(module, x, noise, coefficients)
                x_score = x[:samples]
            else:
                weighted = noise * _row_view(coefficients(noise.dtype)[0], noise)
                layer_grads = _layer_gradient(module, x, weighted)
                x_score = x
            for pname, grad in layer_grads.items():
                key = f"{names[id(module)]}.{pname}"
                grads[key] = grads[key].add_(grad) if key in grads else grad
            score_sq += _score_norm_sq(module, x_score, noise)

        if self.antithetic:
            plus, minus = advantage[:samples], advantage[samples:]
            signal = (plus - minus) / 2  # the baseline cancels within a pair
            bad = (bad_rows[:samples] | bad_rows[samples:]).cpu().numpy()
            score = score_sq
        else:
            signal, bad, score = advantage, bad_rows.cpu().numpy(), score_sq
        # ‖ĝ_sample‖ = |signal|·‖score‖/σ: its second moment is the sample's E‖ĝ‖² ≈ v_i
        stat = (signal.abs() * score.sqrt() / self.sigma).cpu().numpy()
        return ShardResult(
            seed=shard.seed,
            ids=shard.ids,
            values=signal.cpu().numpy(),
            stat_values=np.where(bad, 0.0, stat),
            queries=len(row_ids),
            nonfinite=int(bad.sum()),
            grads={key: grad.cpu() for key, grad in grads.items()},  # to the host once per shard
        )

    def reduce(self, shards: list[Shard], results: list[ShardResult]) -> Update:
        """The shards' partial gradient sums, added in plan order (a fixed order keeps
        every replica's sum bit-identical)."""
        total: dict[str, torch.Tensor] = {}
        for result in results:
            for key, grad in (result.grads or {}).items():
                total[key] = total[key].add_(grad) if key in total else grad.clone()
        return Update(
            grads=total,
            queries=sum(r.queries for r in results),
            nonfinite=sum(r.nonfinite for r in results),
        )

    def write_grad(self, task: Task, update: Update) -> None:
        zero_grads(task)
        params = dict(task.trainable_parameters())
        for key, grad in update.grads.items():
            params[key].grad.add_(grad.to(device=params[key].device, dtype=params[key].dtype))
