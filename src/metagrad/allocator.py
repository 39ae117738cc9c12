"""The host memory allocator: freed memory kept for reuse instead of returned to the operating system.

On Linux, glibc's ``malloc`` serves large blocks with fresh ``mmap`` calls and gives freed memory at the top of
its heap back to the kernel (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``; both adapt up to a few tens of MiB).
A CPU meta-training step allocates and frees the same large activations every iteration (a Conv-4 5-way query
pass: 15 MiB per layer and task), so every iteration faulted its memory in again, page by page, zeroed by the
kernel: about 300,000 page faults and 0.5 s of system time in a 4.3 s step (``benchmarks/conv4.py``'s
protocol, one thread). :func:`keep_freed_memory` raises both thresholds, so that memory, once used, stays in the process
and is reused: the same step then takes about 15 page faults. The peak memory stays close to glibc's (within
1-4 % on Conv-4 5-way, 5-12 % higher at 20 ways and 5 steps, where reused blocks fragment the heap), and the
process keeps it until :func:`release_freed_memory`. PyTorch's performance guide recommends jemalloc or
TCMalloc for the same reason; this is the setting that needs nothing preloaded.

The settings are the process's, for every library in it. :class:`~metagrad.Trainer` applies them on the CPU
once it has built its tasks and learner (``train.keep_freed_memory``, on by default), and so does ``metagrad
eval``. Elsewhere than glibc (macOS, Windows, musl), or where the environment chooses the allocator, nothing is
changed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

__all__ = ["keep_freed_memory", "release_freed_memory"]

# mallopt's parameters (glibc's malloc.h); its largest value (an int); and the largest mmap threshold that older
# glibc accepts (HEAP_MAX_SIZE / 2 on 64 bits: 32 MiB; 2.36 takes more), which keeps Conv-4's 15 MiB activations.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST = 2**31 - 1
_OLD_GLIBC_LARGEST = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
# The user's own choice of allocator or of these settings, which is left alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this Python runs on
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _user_chose() -> bool:
    """Whether the environment already chooses the allocator or its thresholds (then left as chosen)."""
    env = os.environ
    preloaded = env.get("LD_PRELOAD", "").lower()
    return (
        any(k in env for k in _USER_SETTINGS)
        or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
        or any(name in preloaded for name in _OTHER_ALLOCATORS)
    )


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep the memory it frees for the next allocations: large blocks come from its
    heaps instead of an ``mmap`` each, and the heaps are not trimmed (see the module docstring). For the whole
    process: :func:`release_freed_memory` gives back what is free at the time, and later frees are kept again.

    Returns whether the settings were applied: not where the C library is not glibc, nor where the environment
    already chooses (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, glibc's malloc
    tunables in ``GLIBC_TUNABLES``, or jemalloc, TCMalloc or mimalloc in ``LD_PRELOAD``)."""
    libc = _glibc()
    if libc is None or _user_chose():
        return False
    # The mmap threshold first: older glibc refuses one above 32 MiB, and a trim threshold alone (which
    # also freezes the mmap threshold where it is, 128 KiB at first) would fault more than glibc's defaults do.
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST) or libc.mallopt(_M_MMAP_THRESHOLD, _OLD_GLIBC_LARGEST)):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST))


def release_freed_memory() -> bool:
    """Give the memory that ``malloc`` holds free back to the operating system (glibc's ``malloc_trim``), for
    example after training in a notebook. Returns whether any was released (False where not glibc)."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
