"""Keep freed host memory in the process instead of handing it back to the OS.

glibc serves large allocations (activations, noise, gradient products: megabytes each)
with fresh ``mmap`` pages and unmaps them on free, so every query's tensors page-fault
their memory in again: the kernel zeroes each 4 KiB page on first touch. On CPU that
is 5-15% of an lr query at ViT sizes (docs/RESULTS.md). The fix PyTorch's CPU tuning
guide gives is a caching allocator (jemalloc, tcmalloc via LD_PRELOAD); the same effect
from inside the process is two glibc settings: large blocks come from the heap, and
the heap is never trimmed. The process then holds its peak, as CUDA's caching
allocator does on a GPU. ``run.retain_host_memory: false`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
_retained: bool | None = None  # None: not tried yet in this process
_libc: ctypes.CDLL | None = None  # glibc, once the settings were applied


def retain_freed_memory() -> bool:
    """Tune glibc's malloc, tried once per process; False where the C library is not
    glibc (macOS, musl), which is left as it is, or where glibc refused."""
    global _retained
    if _retained is None:
        _retained = _tune_glibc()
    return _retained


def _tune_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only; musl's mallopt is a stub
        return False
    # mallopt returns 1 on success; -1 disables trimming entirely (man 3 mallopt)
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1):
        global _libc
        _libc = libc
        return True
    log.warning("glibc refused the malloc settings; freed host memory goes back to the OS")
    return False


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS once (``malloc_trim``), for a process
    that retains freed memory and then changes what it allocates: a benchmark moving
    from one workload's measurement to the next would otherwise hold every workload's
    holes as well as its peak (a CLIP ViT-B/32 run of the throughput benchmark reached
    24 GiB that way). Nothing to do where the settings were not applied."""
    if _libc is not None:
        _libc.malloc_trim(0)
