"""Exact sums of gradient tensors: the same bits whichever process added which part.

A float sum depends on the order its terms meet. When the shards' partial gradient
sums are all-reduced among workers, that order depends on which worker ran which
shard, so a step re-run after a fault, or replayed alone by a rebuilt replica, would
differ in the last bits from the fault-free run. Integer addition has no order: every
term is written in fixed point (int64) with one scale per tensor, the integers are
added (locally, then across processes), and the total is converted back once.

Scale: tensor t gets 2^k_t with k_t chosen from max|t| over *all* terms and the number
of terms, so the integer total stays below 2^62 (no overflow in any order). Each term
is rounded once, so every element of the sum is within ``terms · 2^-(k_t+1)`` of the
exact sum of the float terms, i.e. about ``terms² · max|t| · 2^-63`` — far below the
float32 resolution of the largest element (docs/METHOD.md §8).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

_TOTAL_BITS = 62  # the int64 total stays below 2^62
_BUCKET_ELEMENTS = 1 << 22  # integers reduced per collective call (32 MiB)
_EXPONENT_LIMIT = 1000  # 2^±1000 is a finite float64


class Collective(Protocol):
    """All-reduce among the processes that share a sum (cluster: a torch.distributed
    group of QueryWorkers); each call is in place and returns the reduced tensor."""

    def max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


Layout = dict[str, tuple[torch.Size, torch.dtype]]  # name -> (shape, dtype of the total)


def layout_of(partials: list[dict[str, torch.Tensor]]) -> Layout:
    """The names, shapes and dtypes of the tensors in ``partials`` (first occurrence)."""
    layout: Layout = {}
    for partial in partials:
        for name, tensor in partial.items():
            layout.setdefault(name, (tensor.shape, tensor.dtype))
    return layout


def scale_exponents(max_abs: torch.Tensor, terms: int) -> list[int]:
    """k_t per tensor with terms · max|t| · 2^k_t < 2^62 (0 for an all-zero or
    non-finite tensor)."""
    headroom = max(terms - 1, 0).bit_length()  # ceil(log2(terms))
    exponents = []
    for value in max_abs.tolist():
        if value == 0.0 or not math.isfinite(value):
            exponents.append(0)
            continue
        _, top = math.frexp(value)  # value < 2^top
        exponent = _TOTAL_BITS - top - headroom
        exponents.append(max(-_EXPONENT_LIMIT, min(_EXPONENT_LIMIT, exponent)))
    return exponents


def encode(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """round(t · 2^k) as int64 (scaling by a power of two is exact in float64)."""
    scaled = tensor.detach().to("cpu", torch.float64, copy=True)  # the caller's is untouched
    return scaled.mul_(math.ldexp(1.0, exponent)).round_().long()


def decode(total: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    return (total.double() * math.ldexp(1.0, -exponent)).to(dtype)


def exact_sum(
    partials: list[dict[str, torch.Tensor]],
    layout: Layout,
    terms: int,
    collective: Collective | None = None,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Σ over ``terms`` partial sums of named tensors, bit-identical however the terms
    are split among processes: this process holds ``partials`` (a missing name counts
    as zeros) and ``collective`` adds the other processes' shares (None: all here).
    A tensor with a non-finite element in any term sums to NaN (the step is dropped).
    ``consume``: each partial tensor is removed from its dict once encoded, so the
    terms and the total are not both held whole (a caller that needs them keeps False)."""
    names = list(layout)
    max_abs = torch.zeros(len(names), dtype=torch.float64)
    for j, name in enumerate(names):
        for partial in partials:
            if name in partial:
                # NaN counts as +inf: MAX must see it, and NaN compares with nothing
                value = torch.nan_to_num(
                    partial[name].detach().abs().max().double(), nan=math.inf, posinf=math.inf
                )
                max_abs[j] = torch.maximum(max_abs[j], value.cpu())
    if collective is not None:
        max_abs = collective.max(max_abs)
    exponents = scale_exponents(max_abs, terms)
    totals: dict[str, torch.Tensor] = {}
    for bucket in _buckets(names, layout):
        flat = torch.cat(
            [_local_total(partials, names[j], layout, exponents[j], consume) for j in bucket]
        )
        if collective is not None:
            flat = collective.sum(flat)
        sizes = [math.prod(layout[names[j]][0]) for j in bucket]
        for j, part in zip(bucket, flat.split(sizes), strict=True):
            shape, dtype = layout[names[j]]
            finite = math.isfinite(max_abs[j].item())
            totals[names[j]] = (
                decode(part, exponents[j], dtype).view(shape)
                if finite
                else torch.full(shape, math.nan, dtype=dtype)
            )
    return totals


def _local_total(partials, name: str, layout: Layout, exponent: int, consume: bool) -> torch.Tensor:
    shape, _ = layout[name]
    total = torch.zeros(math.prod(shape), dtype=torch.int64)
    for partial in partials:
        if name in partial:  # a non-finite term's tensor is NaN in the total anyway
            total += encode(partial.pop(name) if consume else partial[name], exponent).flatten()
    return total


def _buckets(names: list[str], layout: Layout) -> list[list[int]]:
    """Consecutive tensors (by index) grouped into collective calls of about
    _BUCKET_ELEMENTS integers."""
    buckets: list[list[int]] = []
    filled = 0
    for j, name in enumerate(names):
        size = math.prod(layout[name][0])
        if not buckets or filled + size > _BUCKET_ELEMENTS:
            buckets.append([])
            filled = 0
        buckets[-1].append(j)
        filled += size
    return buckets
