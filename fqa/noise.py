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


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x·c) mod 2³² for x < 2³², split in 16-bit halves so no product reaches 2⁶³."""
    high = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return (x * (c & 0xFFFF)).add_(high).bitwise_and_(_M32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply), bijective on [0, 2³²)."""
    x = x.bitwise_xor(x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x.bitwise_xor_(x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def sign_bits(key: tuple[int, int], start: int, count: int, device) -> torch.Tensor:
    """uint8 {0, 1} for elements [start, start + count) of the stream ``key``."""
    first, last = start // _BITS_PER_WORD, (start + count - 1) // _BITS_PER_WORD
    words = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = _mix32(_mix32(words.bitwise_xor_(key[0])).bitwise_xor_(key[1]))
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
    octets = (words[:, None] >> shifts).bitwise_and_(0xFF).to(torch.uint8)  # [W, 4]
    bit = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (octets[:, :, None] >> bit).bitwise_and_(1).flatten()  # element order within a word
    offset = start - first * _BITS_PER_WORD
    return bits[offset : offset + count]


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


def perturbed(param: torch.Tensor, key: tuple[int, int], scale: float) -> torch.Tensor:
    """A new tensor θ + scale·u; θ itself is left untouched (so restoring is exact)."""
    return add_direction_(param.detach().clone(), key, scale)
