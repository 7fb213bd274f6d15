"""Device-independent spsa directions: Rademacher ±1 signs from an integer hash.

Element e of parameter j in direction ``seed`` has the sign bit ``e mod 32`` of the
32-bit word ``hash(key_j, e div 32)``, where ``key_j`` is derived on the host from
(seed, j). The hash uses only integer adds, multiplies, shifts and xors on values
below 2⁶³ (no overflow), so every device computes the same bits, whatever chunk
of a parameter it generates and in whatever order — no generator state, no stream
to keep in step. Each parameter has its own key, hence its own stream
(docs/METHOD.md §7).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_BITS_PER_WORD = 32
# elements generated at once: bounds the temporaries (a few bytes per element)
CHUNK = 1 << 18


@lru_cache(maxsize=65536)
def parameter_key(seed: int, index: int) -> tuple[int, int]:
    """Two 32-bit keys for parameter ``index`` of direction ``seed`` (host integers)."""
    k0, k1 = np.random.SeedSequence([int(seed), 0x6E6F697365, int(index)]).generate_state(2)
    return int(k0), int(k1)


# odd multipliers below 2³¹: a product with x < 2³² stays below 2⁶³ (no int64 overflow)
_C1, _C2 = 0x7FEB352D, 0x5BD1E995


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xorshift-multiply finaliser, bijective on [0, 2³²)."""
    x = x.bitwise_xor(x >> 16).mul_(_C1).bitwise_and_(_M32)
    x = x.bitwise_xor_(x >> 15).mul_(_C2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _words_to_bits(words: torch.Tensor, k0, k1) -> torch.Tensor:
    """uint8 bits of hash(word) (32 per word, bit b of word w is element 32w + b)."""
    words = _mix32(_mix32(words.bitwise_xor_(k0)).bitwise_xor_(k1))
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=words.device)
    octets = (words[:, None] >> shifts).bitwise_and_(0xFF).to(torch.uint8)  # [W, 4]
    bit = torch.arange(8, dtype=torch.uint8, device=words.device)
    return (octets[:, :, None] >> bit).bitwise_and_(1).flatten()


def sign_bits(key: tuple[int, int], start: int, count: int, device) -> torch.Tensor:
    """uint8 {0, 1} for elements [start, start + count) of the stream ``key``."""
    first, last = start // _BITS_PER_WORD, (start + count - 1) // _BITS_PER_WORD
    words = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    bits = _words_to_bits(words, key[0], key[1])
    offset = start - first * _BITS_PER_WORD
    return bits[offset : offset + count]


def sign_bits_many(keys: list[tuple[int, int]], counts: list[int], device) -> list[torch.Tensor]:
    """``sign_bits(key, 0, count)`` for many streams in one pass (keys become tensors):
    the same bits, at the per-call cost of one — what small parameters need."""
    if not keys:
        return []
    n_words = [(count + _BITS_PER_WORD - 1) // _BITS_PER_WORD for count in counts]
    lengths = torch.tensor(n_words, device=device)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(sum(n_words))
    words = torch.arange(total, dtype=torch.int64, device=device)
    words -= torch.repeat_interleave(starts, lengths, output_size=total)
    k0 = torch.repeat_interleave(
        torch.tensor([k[0] for k in keys], device=device), lengths, output_size=total
    )
    k1 = torch.repeat_interleave(
        torch.tensor([k[1] for k in keys], device=device), lengths, output_size=total
    )
    bits = _words_to_bits(words, k0, k1).split([32 * n for n in n_words])
    return [b[:count] for b, count in zip(bits, counts, strict=True)]


def signed(bits: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale·u with u = 2b − 1 ∈ {−1, +1}; exact (both ±scale are representable)."""
    return bits.to(dtype).mul_(2 * scale).sub_(scale)


def add_direction_(target: torch.Tensor, key: tuple[int, int], scale: float) -> torch.Tensor:
    """target += scale·u for the whole (flattened) tensor, chunk by chunk, in place."""
    flat = target.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        count = min(CHUNK, flat.numel() - start)
        bits = sign_bits(key, start, count, flat.device)
        flat[start : start + count].add_(signed(bits, scale, flat.dtype))
    return target


def direction(key: tuple[int, int], shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """u itself (tests and tools; the estimator never materialises all of it)."""
    return add_direction_(torch.zeros(shape, device=device, dtype=dtype), key, 1.0)


def perturbed(
    param: torch.Tensor, key: tuple[int, int], scale: float, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """A new tensor θ + scale·u (``bits``: u's bits if already generated); θ untouched,
    so restoring is exact."""
    if bits is None:
        return add_direction_(param.detach().clone(), key, scale)
    return param.detach() + signed(bits, scale, param.dtype).view(param.shape)


# parameters up to this size get their bits in one batched pass per direction: for
# them the cost is per-kernel overhead, not per element
SMALL = 1 << 16


class DirectionBits:
    """The bits of every small parameter of one direction, generated together once."""

    def __init__(self, seed: int, params: list[torch.Tensor]) -> None:
        small = [j for j, p in enumerate(params) if p.numel() <= SMALL]
        self.seed = seed
        self.bits: dict[int, torch.Tensor] = {}
        by_device: dict[torch.device, list[int]] = {}
        for j in small:
            by_device.setdefault(params[j].device, []).append(j)
        for device, indices in by_device.items():
            generated = sign_bits_many(
                [parameter_key(seed, j) for j in indices],
                [params[j].numel() for j in indices],
                device,
            )
            self.bits.update(zip(indices, generated, strict=True))

    def add_(self, target: torch.Tensor, index: int, scale: float) -> None:
        """target += scale·u for parameter ``index`` of this direction."""
        bits = self.bits.get(index)
        if bits is None:
            add_direction_(target, parameter_key(self.seed, index), scale)
        else:
            target.view(-1).add_(signed(bits, scale, target.dtype))
