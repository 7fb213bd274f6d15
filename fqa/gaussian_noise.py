"""Seeded N(0, 1) streams that can be replayed: the noise of the lr estimator.

A stream draws its values in order; ``mark()`` taken before a draw and
``GaussianStream.resume(mark, device)`` give the same values again, which is how lr
regenerates ε for its gradient product instead of storing it.

Two sources (docs/METHOD.md §7):

- **counter** (CPU): the C kernel in ``gaussian_noise.c``. Each value is a function of
  the stream's key and its position only (a Box-Muller pair on two hashed counter
  words), computed in vector code: about 2.5× faster than ``torch.randn``'s Mersenne
  Twister on this project's CPUs, where noise is a quarter of an lr query. The kernel
  is compiled with the system's C compiler on first use and cached
  (``$FQA_CACHE_DIR``, default ``~/.cache/fqa``).
- **torch**: a ``torch.Generator`` and ``torch.randn``, whose state is the mark. Used on
  GPUs (Philox is fast there), with ``estimator.noise_source: torch``, and where no C
  compiler is found (with a warning, once).

Each source is reproducible on its own; they draw different values for one seed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

NOISE_SOURCES = ("auto", "torch")  # auto: counter on the CPU when the kernel builds
_KERNEL_SOURCE = Path(__file__).with_name("gaussian_noise.c")
_WORDS = 1 << 32  # a stream's counter is 32 bits wide
_KEY_TAG = 0x67617573  # keeps these keys apart from spsa's direction keys


class CounterMark(NamedTuple):
    """Where a counter stream stands: its key and the next word."""

    k0: int
    k1: int
    word: int


def _cpu_flags() -> list[str]:
    """Vector code that runs on this CPU: AVX2 + FMA (x86-64-v3) where it has them.
    The values follow the build: clusters of mixed CPUs use noise_source: torch."""
    flags = ["-O3", "-ffast-math", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            cpu = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpu = ""
        if " avx2" in cpu and " fma" in cpu and " bmi2" in cpu:
            flags.append("-march=x86-64-v3")
    return flags


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("FQA_CACHE_DIR")
    if configured:
        return [Path(configured)]
    return [Path.home() / ".cache" / "fqa", Path(tempfile.gettempdir()) / "fqa-cache"]


def _build(compiler: str, flags: list[str]) -> Path:
    """The compiled kernel, built once per (source, flags) and shared by every process:
    each builds into its own temporary name, then renames it into place."""
    digest = hashlib.sha256(_KERNEL_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()
    errors = []
    for cache in _cache_dirs():
        library = cache / f"gaussian_noise-{digest[:16]}.so"
        if library.exists():
            return library
        try:
            cache.mkdir(parents=True, exist_ok=True)
            partial = cache / f".{library.name}.{os.getpid()}"
            command = [compiler, *flags, "-o", str(partial), str(_KERNEL_SOURCE), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, library)
            return library
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{cache}: {error}")
    raise OSError("; ".join(errors))


@functools.lru_cache(maxsize=1)
def cpu_kernel():
    """The counter kernel's fill function, or None (no C compiler, or the build failed:
    the torch source is used instead)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc/gcc, or $CC): lr noise on the CPU from torch.randn")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, _cpu_flags())))
    except OSError as error:
        log.warning("lr noise kernel unavailable (%s): using torch.randn on the CPU", error)
        return None
    fill = library.fqa_fill_normal
    fill.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_uint32] * 3
    fill.restype = None
    return fill


def check_noise_source(source: str) -> str:
    if source not in NOISE_SOURCES:
        raise ValueError(
            f"estimator.noise_source={source!r} is not one of {NOISE_SOURCES} "
            "(auto: the counter kernel on the CPU, torch.randn elsewhere; torch: torch.randn)"
        )
    return source


class GaussianStream:
    """N(0, 1) values in order from the stream ``seed`` on ``device``."""

    def __init__(self, seed: int, device, source: str = "auto"):
        self.device = torch.device(device)
        counter = check_noise_source(source) == "auto" and self.device.type == "cpu"
        self._fill = cpu_kernel() if counter else None
        if self._fill is not None:
            k0, k1 = np.random.SeedSequence([int(seed), _KEY_TAG]).generate_state(2)
            self._at = CounterMark(int(k0), int(k1), 0)
        else:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(int(seed))

    @classmethod
    def resume(cls, mark, device) -> GaussianStream:
        """The stream as it stood at ``mark`` (from ``mark()`` on a stream of either source)."""
        stream = cls.__new__(cls)
        stream.device = torch.device(device)
        if isinstance(mark, CounterMark):
            stream._fill, stream._at = cpu_kernel(), mark
            if stream._fill is None:
                raise RuntimeError("a counter noise mark, but the noise kernel is unavailable here")
        else:
            stream._fill = None
            stream._generator = torch.Generator(device=stream.device)
            stream._generator.set_state(mark)
        return stream

    def mark(self):
        return self._at if self._fill is not None else self._generator.get_state()

    def draw(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._fill is None:
            return torch.randn(shape, generator=self._generator, device=self.device, dtype=dtype)
        count = math.prod(shape)
        words = count + (count & 1)  # whole Box-Muller pairs: the next draw starts fresh
        k0, k1, word = self._at
        if word + words > _WORDS:
            raise ValueError(
                f"one noise stream drew more than 2^32 values ({word + words} words); "
                "lower estimator.shard_rows"
            )
        values = torch.empty(shape, dtype=torch.float32)
        if count:
            self._fill(values.data_ptr(), count, word, k0, k1)
        self._at = CounterMark(k0, k1, word + words)
        return values if dtype == torch.float32 else values.to(dtype)
