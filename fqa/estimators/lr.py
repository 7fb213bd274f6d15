"""Likelihood-ratio estimator: Gaussian noise injected into layer outputs (Linear, Conv2d).

For a hooked layer y = Wx + b, the query adds σε to y; with the query's loss l and
the datapoint's unperturbed loss b_i as baseline,

    ∇_W ≈ (l − b_i)·(ε/σ)xᵀ,   ∇_b ≈ (l − b_i)·ε/σ     (summed over tokens)

Each trainable nn.Linear (optionally nn.Conv2d) gets its own noise in the same forward,
so one query estimates all layers at once. Samples are antithetic pairs (ε, −ε) by
default, in which case the baseline cancels and the pair is a central difference.
The gradient is accumulated as one matrix product per layer over the shard's rows.
A plain Linear adds its noise inside its own matmul (xWᵀ accumulated into b ± σε);
other layers get a forward hook that adds it to the output.
Memory: ε is never stored — each layer's noise-stream mark is, and ε is redrawn from it
for the product — so a query keeps only the hooked layers' inputs until the loss is
known; with ``recompute_hidden`` not an MLP's hidden activation (the 4×-wide input of
its second layer: the MLP is replayed from its input when the product is formed); with
``two_pass`` no input at all (a second forward replays the same queries and accumulates
each layer as its hook fires). The per-sample statistic the allocators read,
‖Σ_t ε_t x_tᵀ‖² per layer, is exact or, where a layer sees many tokens, an unbiased
estimate from ``score_probes`` random probes (docs/METHOD.md §2).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

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
)
from fqa.exact_sum import exact_sum, layout_of
from fqa.gaussian_noise import GaussianStream, check_noise_source
from fqa.noise import parameter_key, signed
from fqa.seeding import derive_seed
from fqa.tasks.base import Task

log = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Noise and gradient products in fp32 when the forward runs in bf16 (autocast)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def layer_seed(seed: int, layer: int) -> int:
    """The noise seed of hooked layer ``layer`` in the shard ``seed``: one stream per layer."""
    k0, k1 = parameter_key(seed, layer)
    return (k0 << 31) ^ k1


def hooked_modules(model: nn.Module, include_conv: bool) -> list[tuple[str, nn.Module]]:
    """Linear (and Conv2d) modules that own a trainable parameter, in a fixed order.

    nn.MultiheadAttention's ``out_proj`` is a Linear whose forward is never called (the
    attention uses its weight directly), so a hook there would never fire: it is left
    out, and counts as unestimated like the attention's own ``in_proj_weight``."""
    kinds = (nn.Linear, nn.Conv2d) if include_conv else (nn.Linear,)
    never_called = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        and id(module) not in never_called
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
    """Adds σε to each hooked layer's output (inside a plain Linear's matmul, else by a
    forward hook) and hands each layer's (module, input x, noise ε, stream mark
    before ε) to ``consume``. ``remove()`` restores the layers.

    ε itself is not kept: the gradient regenerates it from the saved stream mark,
    so a query stores only what the product Σ_r c_r ε_r x_rᵀ cannot recompute."""

    def __init__(
        self,
        modules,
        sigma: float,
        seed: int,
        pairs: int | None,
        consume,
        start: dict | None = None,
        given: dict[int, torch.Tensor] | None = None,
        source: str = "auto",
    ):
        self.sigma = sigma
        self.seed = seed
        self.source = source
        self.layer = {id(module): index for index, (_, module) in enumerate(modules)}
        self.streams: dict[int, GaussianStream] = {}
        # a replay (_replay_hidden): each layer's stream mark, or its noise itself
        self.start = start or {}
        self.given = given or {}
        self.pairs = pairs  # antithetic: rows = [+ε for pairs] + [−ε for pairs]
        self.consume = consume
        self.handles = []
        self.patched: list[nn.Module] = []
        for _, module in modules:
            if type(module).forward is nn.Linear.forward:
                # the noise rides in the bias term of the layer's own matmul (below)
                module.forward = functools.partial(self._noisy_linear, module)
                self.patched.append(module)
            else:
                self.handles.append(module.register_forward_hook(self._hook))

    def _stream(self, module: nn.Module, device: torch.device) -> GaussianStream:
        """Each layer its own noise stream, seeded from (shard seed, layer), on this device:
        reproducible per device type; never needs replaying elsewhere (docs/METHOD.md §7)."""
        stream = self.streams.get(id(module))
        if stream is None:
            if id(module) in self.start:
                stream = GaussianStream.resume(self.start[id(module)], device)
            else:
                seed = layer_seed(self.seed, self.layer[id(module)])
                stream = GaussianStream(seed, device, self.source)
            self.streams[id(module)] = stream
        return stream

    def _noise(self, module: nn.Module, output: torch.Tensor):
        """(ε, the stream mark it was drawn from) for this call of ``module``."""
        if id(module) in self.given:
            return self.given.pop(id(module)), None
        stream = self._stream(module, output.device)
        state = stream.mark()
        return _draw_noise(stream, output, self.pairs), state

    def _noisy_linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """y = xWᵀ + (b ± σε) as one matmul accumulating into the noisy bias: the hook's
        (xWᵀ + b) + σε rounded in another order, without the pass that copies b into y
        and the pass that adds ε (a few % of a query on CPU). Where autograd records,
        autocast runs, or the dtypes differ, the plain forward and the hook instead."""
        weight, bias = module.weight, module.bias
        if (
            (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.is_autocast_enabled(x.device.type)
            or x.dim() < 2
            or not x.dtype == weight.dtype == _noise_dtype(x.dtype)
        ):
            return self._hook(module, (x,), nn.Linear.forward(module, x))
        output = torch.empty(
            (*x.shape[:-1], module.out_features), dtype=x.dtype, device=x.device
        )
        noise, state = self._noise(module, output)
        shift = bias if bias is not None else torch.zeros((), dtype=x.dtype, device=x.device)
        if self.pairs is not None:
            torch.add(shift, noise, alpha=self.sigma, out=output[: self.pairs])
            torch.add(shift, noise, alpha=-self.sigma, out=output[self.pairs :])
        else:
            torch.add(shift, noise, alpha=self.sigma, out=output)
        output.view(-1, module.out_features).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        self.consume(module, x, noise, state)
        return output

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        in_place = not (torch.is_grad_enabled() and output.requires_grad)
        noise, state = self._noise(module, output)
        if self.pairs is not None:
            # only the + half is drawn: rows [:pairs] get +σε, rows [pairs:] get −σε
            if in_place:
                output[: self.pairs].add_(noise, alpha=self.sigma)
                output[self.pairs :].sub_(noise, alpha=self.sigma)
            else:
                output = output + (self.sigma * torch.cat([noise, -noise])).to(output.dtype)
        else:
            output = (
                output.add_(noise, alpha=self.sigma)
                if in_place
                else output + (self.sigma * noise).to(output.dtype)
            )
        self.consume(module, inputs[0], noise, state)
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.patched:
            del module.forward  # the class's forward again


def _draw_noise(stream: GaussianStream, output: torch.Tensor, pairs: int | None):
    """ε for one layer's output (its + half when antithetic); the same stream mark and
    output shape always give the same ε, which is how it is regenerated."""
    shape = (pairs, *output.shape[1:]) if pairs is not None else output.shape
    return stream.draw(shape, _noise_dtype(output.dtype))  # fp32 noise under bf16 autocast


@dataclasses.dataclass(frozen=True)
class _Hidden:
    """An MLP whose hidden activation (``target``'s input) is recomputed, not stored:
    ``parent(x)`` replayed from its input, which ``first`` reads and keeps anyway, and
    stopped where ``target`` would start. ``others``: its other hooked layers, whose
    noise a replay must add too if they run before ``target``."""

    parent: nn.Module
    first: nn.Linear
    target: nn.Linear
    others: tuple[nn.Module, ...]


def hidden_layers(model: nn.Module, modules) -> list[_Hidden]:
    """The MLPs among the hooked layers' parents: a module whose first hooked layer is a
    Linear followed by a Linear that reads a wider tensor (fc1 → act → fc2: fc2 reads
    the 4×-wide hidden activation, the largest input a transformer block keeps). Nested
    candidates (a layer claimed by two) are left alone."""
    named = dict(model.named_modules())
    children: dict[str, list[nn.Module]] = {}
    for name, module in modules:
        children.setdefault(name.rpartition(".")[0], []).append(module)
    found = []
    for parent_name, (first, *rest) in children.items():
        if not isinstance(first, nn.Linear):
            continue
        wider = [m for m in rest if isinstance(m, nn.Linear) and m.in_features > first.in_features]
        if not wider:
            continue
        prefix = f"{parent_name}." if parent_name else ""
        others = tuple(
            m for n, m in modules if n.startswith(prefix) and m is not first and m is not wider[0]
        )
        found.append(_Hidden(named[parent_name], first, wider[0], others))
    claims: dict[int, int] = {}
    for h in found:
        for m in (h.first, h.target, *h.others):
            claims[id(m)] = claims.get(id(m), 0) + 1
    return [h for h in found if all(claims[id(m)] == 1 for m in (h.first, h.target, *h.others))]


@dataclasses.dataclass
class _Saved:
    """One hooked layer call of pass 1: its input (None until replayed, for a hidden
    activation), its stream mark, its noise's shape and, for an MLP's first layer,
    the replay that recomputes the hidden activation."""

    module: nn.Module
    x: torch.Tensor | None
    state: object  # the stream mark ε was drawn from (fqa.gaussian_noise)
    shape: torch.Size
    replay: _Replay | None = None


@dataclasses.dataclass
class _Replay:
    hidden: _Hidden
    autocast: tuple[bool, torch.dtype]
    # the MLP's layers that ran between its first layer and the target, with the state
    # of their streams (the first layer's noise is handed over as redrawn)
    ran: dict[int, tuple[nn.Module, object]] = dataclasses.field(default_factory=dict)
    target: int = -1  # the index of the target's entry


_NO_REPLAY = object()  # an MLP call whose layers did not start with its first


class _SavedInputs:
    """Pass-1 consumer of the single-pass mode: each layer's input and stream mark.

    With ``hidden`` MLPs, their hidden activation is not kept: the MLP's input (its first
    layer's input, kept anyway) and the stream marks replay it when its product is
    formed, at the cost of the first layer's matmul again (``recompute_hidden``)."""

    def __init__(self, hidden: list[_Hidden] = ()) -> None:
        self.saved: list[_Saved] = []
        self.role = {id(m): h for h in hidden for m in (h.first, h.target, *h.others)}
        self.inputs: dict[int, torch.Tensor] = {}  # an MLP's input, during its call
        self.calls: dict[int, object] = {}  # its _Replay, once its first layer ran
        self.handles = []
        for h in hidden:
            self.handles.append(h.parent.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(h.parent.register_forward_hook(self._leave))

    def _enter(self, parent: nn.Module, args, kwargs) -> None:
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and not _replay_changes_anything(parent):
            self.inputs[id(parent)] = x
        self.calls.pop(id(parent), None)

    def _leave(self, parent: nn.Module, args, output) -> None:
        self.inputs.pop(id(parent), None)
        self.calls.pop(id(parent), None)

    def __call__(self, module, x, noise, state) -> None:
        entry = _Saved(module, x, state, noise.shape)
        hidden = self.role.get(id(module))
        key = id(hidden.parent) if hidden is not None else None
        if key in self.inputs:
            replay = self.calls.get(key)
            if replay is None:  # the MLP's first hooked layer to run: its first, on its input?
                if module is hidden.first and x is self.inputs[key]:
                    device = x.device.type
                    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                    entry.replay = self.calls[key] = _Replay(hidden, autocast)
                else:
                    self.calls[key] = _NO_REPLAY
            elif replay is not _NO_REPLAY and replay.target < 0:
                if module is hidden.target:
                    replay.target, entry.x = len(self.saved), None
                else:
                    replay.ran.setdefault(id(module), (module, state))
        self.saved.append(entry)

    def fired(self) -> set[int]:
        return {id(entry.module) for entry in self.saved}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _replay_changes_anything(parent: nn.Module) -> bool:
    """Whether a replay of ``parent`` would differ or leave a trace: in training mode,
    active dropout draws another mask and batch norm updates its running statistics
    again. Such an MLP keeps its hidden activation instead."""
    return parent.training and any(
        (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)
        for m in parent.modules()
    )


class _Captured(Exception):
    """Raised where a replay has what it came for, before the layer's own matmul."""


def _replay_hidden(replay: _Replay, x, noise, sigma: float, seed: int, pairs) -> torch.Tensor:
    """The MLP's hidden activation exactly as pass 1 computed it: the MLP's forward on
    its saved input with the same noise (the first layer's as just regenerated, the
    others' from their states), stopped at the target's input."""
    hidden, captured = replay.hidden, []

    def capture(module, inputs):
        captured.append(inputs[0])
        raise _Captured

    layers = [(None, hidden.first)] + [(None, m) for m, _ in replay.ran.values()]
    start = {key: state for key, (_, state) in replay.ran.items()}
    given = {id(hidden.first): noise}
    # every layer has its noise or its stream's mark (which names its source)
    injector = _NoiseInjector(layers, sigma, seed, pairs, lambda *_: None, start, given)
    handle = hidden.target.register_forward_pre_hook(capture)
    enabled, dtype = replay.autocast
    try:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            hidden.parent(x)
    except _Captured:
        pass
    finally:
        injector.remove()
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"lr recompute_hidden: replaying {type(hidden.parent).__name__} did not reach "
            "its layer again; set estimator.recompute_hidden: false for this model"
        )
    return captured[0]


class _FiredLayers:
    """Pass-1 consumer of the two-pass mode: keeps nothing but which layers ran."""

    def __init__(self) -> None:
        self.ids: set[int] = set()

    def __call__(self, module, x, noise, state) -> None:
        self.ids.add(id(module))

    def fired(self) -> set[int]:
        return self.ids

    def remove(self) -> None:
        pass


def _check_every_hook_fired(modules, fired: set[int]) -> None:
    """A hooked layer the forward never called would silently get a zero gradient."""
    silent = [name for name, module in modules if id(module) not in fired]
    if silent:
        raise ValueError(
            f"lr: trainable layers {silent[:3]} ({len(silent)} in all) were never called as "
            "modules in the forward (their parent uses the weight directly), so their noise "
            "and gradient would be missing; freeze them (requires_grad=False) or use spsa"
        )


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
    row_sums: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Antithetic Σ_r c_r ε_r ⊗ x_r with ε = [half, −half]: Σ_p half_p ⊗ (c⁺_p x⁺_p − c⁻_p x⁻_p).

    One product of half the rows; exact because the gradient is bilinear in (noise, x).
    ``coefficients(dtype)`` gives (c⁺, c⁻, c⁺ − c⁻) in that dtype; ``row_sums``, each
    row's noise summed over tokens (Linear), when the caller has it already."""
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
            per_row = _token_sums(half) if row_sums is None else row_sums
        grads["bias"] = diff @ per_row
    return grads


def _conv_score_norm_sq(module: nn.Conv2d, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """‖Σ_pos ε_pos ⊗ patch_pos‖² (+ ‖Σ_pos ε_pos‖² for the bias) per row of a Conv2d.

    The weight score is a sum over output positions, so cross-position terms count:
    ‖ε‖²‖x‖² (the dense formula) overstates it. Either per-row form below is exact;
    the cheaper is chosen: the (C_out × C_in·k²) score itself, or the position Gram
    identity Σ_{p,q} (ε_p·ε_q)(patch_p·patch_q) (cheap when few positions)."""
    rows, groups = noise.shape[0], module.groups
    sq = torch.zeros(rows, dtype=torch.float64, device=noise.device)
    if module.weight.requires_grad:
        pad = module._reversed_padding_repeated_twice  # also covers padding="same"
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = torch.nn.functional.pad(x, pad, mode=mode) if any(pad) else x
        patches = torch.nn.functional.unfold(
            padded, module.kernel_size, dilation=module.dilation, stride=module.stride
        )  # [rows, C_in·k², positions], channel-major like the weight
        positions = patches.shape[-1]
        patches = patches.reshape(rows, groups, -1, positions).to(noise.dtype)
        eps = noise.reshape(rows, groups, -1, positions)
        c_out, c_in = eps.shape[2], patches.shape[2]
        if positions * (c_out + c_in) < c_out * c_in:
            gram = torch.einsum("rgap,rgaq->rgpq", eps, eps)
            gram *= torch.einsum("rgbp,rgbq->rgpq", patches, patches)
            sq += gram.sum((1, 2, 3)).double()
        else:
            score = torch.einsum("rgap,rgbp->rgab", eps, patches)
            sq += score.pow(2).sum((1, 2, 3)).double()
    if module.bias is not None and module.bias.requires_grad:
        sq += noise.sum((2, 3)).pow(2).sum(1).double()
    return sq


def _token_sums(noise: torch.Tensor) -> torch.Tensor:
    """Each row's Linear-layer noise summed over its tokens (rows × out): the bias's
    gradient and score both read it."""
    return noise.reshape(noise.shape[0], -1, noise.shape[-1]).sum(1)


def _score_norm_sq(
    module: nn.Module,
    x: torch.Tensor,
    noise: torch.Tensor,
    probes: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖Σ_tokens ε_t x_tᵀ‖² (+ bias term) per row: the size of this layer's score.

    ``probes`` (in × k, Rademacher): the weight term estimated as ‖S z‖²/k, unbiased
    because E[z zᵀ] = k·I, at T·k·(in+out) per row instead of the exact T²·(in+out).
    ``row_sums``: ``_token_sums(noise)`` when the caller has it already."""
    if isinstance(module, nn.Conv2d):
        return _conv_score_norm_sq(module, x, noise)
    if noise.dim() == 2:
        sq = noise.pow(2).sum(1) * x.pow(2).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            sq = sq + noise.pow(2).sum(1)
        return sq
    rows = noise.shape[0]
    noise3, x3 = noise.reshape(rows, -1, noise.shape[-1]), x.reshape(rows, -1, x.shape[-1])
    if probes is not None:
        projected = (x3 @ probes).transpose(1, 2).contiguous()  # (x z)ᵀ: rows × k × T
        sq = torch.bmm(projected, noise3).pow(2).sum((1, 2)) / probes.shape[1]
    else:
        # bmm with a contiguous right operand: far faster on CPU than a transposed view
        gram = torch.bmm(noise3, noise3.transpose(1, 2).contiguous())
        gram *= torch.bmm(x3, x3.transpose(1, 2).contiguous())
        sq = gram.sum((1, 2))
    if module.bias is not None and module.bias.requires_grad:
        sq = sq + (_token_sums(noise) if row_sums is None else row_sums).pow(2).sum(1)
    return sq


def _probes_pay(x: torch.Tensor, probes: int) -> bool:
    """Random probes when they at least halve the exact Gram's cost (T ≥ 2k tokens)."""
    return probes > 0 and x.dim() > 2 and x[0].numel() // x.shape[-1] >= 2 * probes


class _GradientProduct:
    """Σ_r c_r ε_r x_rᵀ (and the per-row score norms), accumulated one layer at a time."""

    def __init__(
        self,
        modules,
        coefficient: torch.Tensor,
        samples: int,
        antithetic: bool,
        probes: int = 0,
        seed: int = 0,
    ):
        self.names = {id(module): name for name, module in modules}
        self.layer = {id(module): index for index, (_, module) in enumerate(modules)}
        self.probes, self.probe_seed = probes, derive_seed(seed, "score_probes")
        self.coefficient = coefficient
        self.samples = samples
        self.antithetic = antithetic
        self.grads: dict[str, torch.Tensor] = {}
        # antithetic: ε and −ε have the same score norm, so + rows only
        self.score_sq = torch.zeros(samples, dtype=torch.float64, device=coefficient.device)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if dtype not in self._cast:  # one conversion per dtype, not per layer
            c, n = self.coefficient, self.samples
            self._cast[dtype] = (
                (c[:n].to(dtype), c[n:].to(dtype), (c[:n] - c[n:]).to(dtype))
                if self.antithetic
                else (c.to(dtype),)
            )
        return self._cast[dtype]

    def add(self, module: nn.Module, x: torch.Tensor, noise: torch.Tensor, _state=None) -> None:
        x = x.to(noise.dtype)  # fp32 products under bf16 autocast
        row_sums = None  # a Linear bias's per-row noise sums, formed once for both uses
        if isinstance(module, nn.Linear) and module.bias is not None and module.bias.requires_grad:
            row_sums = _token_sums(noise)
        if self.antithetic:
            layer_grads = _pair_gradient(module, x, noise, self.coefficients, row_sums)
            x_score = x[: self.samples]
        else:
            weighted = noise * _row_view(self.coefficients(noise.dtype)[0], noise)
            layer_grads = _layer_gradient(module, x, weighted)
            x_score = x
        for pname, grad in layer_grads.items():
            key = f"{self.names[id(module)]}.{pname}"
            self.grads[key] = self.grads[key].add_(grad) if key in self.grads else grad
        probes = self._probes(module, x_score)
        self.score_sq += _score_norm_sq(module, x_score, noise, probes, row_sums)

    def _probes(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's Rademacher probes (in × k) from its own seeded stream, or None
        (exact) when they would not pay."""
        if isinstance(module, nn.Conv2d) or not _probes_pay(x, self.probes):
            return None
        generator = torch.Generator(device=x.device)
        generator.manual_seed(layer_seed(self.probe_seed, self.layer[id(module)]))
        bits = torch.randint(0, 2, (x.shape[-1], self.probes), generator=generator, device=x.device)
        return signed(bits, 1.0, x.dtype)


@ESTIMATORS.register("lr")
class LikelihoodRatioEstimator(Estimator):
    name = "lr"

    def __init__(
        self,
        sigma: float = 0.1,
        antithetic: bool = True,
        hook_conv: bool = False,
        two_pass: bool = False,
        recompute_hidden: bool = True,
        score_probes: int = 16,
        weighting: str = "unbiased",
        noise_source: str = "auto",
        **_ignored,
    ):
        if not sigma > 0:
            raise ValueError(f"estimator.sigma={sigma} must be > 0 (typical: 0.01-0.5)")
        self.sigma = sigma
        self.antithetic = antithetic
        self.hook_conv = hook_conv
        # two_pass: a second, accumulating forward instead of keeping every layer's input
        # until the loss is known (about 2x the compute, inference-level memory)
        self.two_pass = two_pass
        # recompute_hidden: an MLP's hidden activation (4x a block's width) recomputed from
        # the MLP's input when its product is formed instead of kept: about half the
        # memory for one more matmul of each MLP's first layer (two_pass keeps nothing,
        # so there it changes nothing)
        self.recompute_hidden = recompute_hidden and not two_pass
        if not (isinstance(score_probes, int) and score_probes >= 0):
            raise ValueError(
                f"estimator.score_probes={score_probes!r} must be an integer >= 0 "
                "(0: the exact per-sample score norm; typical: 16)"
            )
        # the allocators' per-sample statistic: exact, or from k random probes per layer
        # where there are at least 2k tokens (unbiased, a fraction of the cost)
        self.score_probes = score_probes
        self.queries_per_sample = 2 if antithetic else 1
        self.weighting = check_weighting(weighting)
        # auto: the counter kernel on the CPU (fqa.gaussian_noise); torch: torch.randn
        self.noise_source = check_noise_source(noise_source)

    def prepare(self, task: Task) -> None:
        """LR estimates only the weights of the layers it injects noise into; the rest
        (norms, embeddings) is frozen rather than left to an optimizer seeing zero
        gradients."""
        frozen = unestimated_parameters(task.model, self.hook_conv)
        params = dict(task.model.named_parameters())
        for name in frozen:
            params[name].requires_grad_(False)
        if frozen:
            log.info("lr: %d parameter tensors outside Linear layers stay frozen", len(frozen))

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

    def plan(self, ids, counts, baselines, seed, shard_rows):
        counts = np.asarray(counts)
        rows = np.repeat(np.arange(len(ids)), counts)  # datapoint i's samples are contiguous
        weights = batch_weights(counts, self.weighting)[rows]
        return [
            Shard(
                derive_seed(seed, "queries", j),
                ids[rows[part]],
                weights[part],
                baselines[rows[part]],
            )
            for j, part in enumerate(chunks(len(rows), shard_rows))
        ]

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
        pairs = samples if self.antithetic else None
        if self.two_pass:
            first = _FiredLayers()
        else:
            hidden = hidden_layers(task.model, modules) if self.recompute_hidden else []
            first = _SavedInputs(hidden)
        source = self.noise_source
        injector = _NoiseInjector(modules, self.sigma, shard.seed, pairs, first, source=source)
        try:
            losses = task.losses(row_ids).double()
        finally:
            injector.remove()
            first.remove()
        _check_every_hook_fired(modules, first.fired())
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
        product = _GradientProduct(
            modules, coefficient, samples, self.antithetic, self.score_probes, shard.seed
        )
        if self.two_pass:
            # replay the same queries (same seed, so the same ε and the same x) and
            # accumulate each layer as its hook fires: nothing is stored across layers
            injector = _NoiseInjector(
                modules, self.sigma, shard.seed, pairs, product.add, source=source
            )
            try:
                task.losses(row_ids)
            finally:
                injector.remove()
        else:
            saved, first.saved = first.saved, []
            for index in range(len(saved)):  # forward order; each x freed once accumulated
                entry, saved[index] = saved[index], None
                stream = GaussianStream.resume(entry.state, entry.x.device)
                noise = stream.draw(entry.shape, _noise_dtype(entry.x.dtype))
                if entry.replay is not None and entry.replay.target >= 0:  # an MLP's hidden
                    saved[entry.replay.target].x = _replay_hidden(
                        entry.replay, entry.x, noise, self.sigma, shard.seed, pairs
                    )
                product.add(entry.module, entry.x, noise, entry.state)
                del entry, noise
        grads, score_sq = product.grads, product.score_sq

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
        """The shards' partial gradient sums, added exactly (fqa.exact_sum): the same
        bits in any order, so replicas agree whoever evaluated which shard. When the sums
        stayed on the workers, the update names the shards and each replica finishes it.
        The results' tensors are consumed as they are added (the gradient is not held
        twice)."""
        queries = sum(r.queries for r in results)
        nonfinite = sum(r.nonfinite for r in results)
        if any(r.grads_held for r in results):
            return Update(pending=list(shards), queries=queries, nonfinite=nonfinite)
        partials = [r.grads for r in results if r.grads]
        grads = exact_sum(partials, layout_of(partials), len(results), consume=True)
        return Update(grads=grads, queries=queries, nonfinite=nonfinite)

    def finish(self, task, update, held, collective=None) -> None:
        if collective is None:  # alone: every shard's sums are evaluated here
            held = {
                j: held[j] if j in held else self.evaluate_exactly(task, shard).grads
                for j, shard in enumerate(update.pending)
            }
        layout = {name: (p.shape, p.dtype) for name, p in task.trainable_parameters()}
        update.grads = exact_sum(list(held.values()), layout, len(update.pending), collective)
        update.pending = []

    def write_grad(self, task: Task, update: Update) -> None:
        """``.grad`` becomes the update's tensor itself when dtype and device match (the
        update is consumed): a zeroed buffer plus a copy would hold every gradient twice."""
        for key, param in task.trainable_parameters():
            grad = update.grads.get(key)
            param.grad = (
                torch.zeros_like(param)
                if grad is None
                else grad.to(device=param.device, dtype=param.dtype)
            )
