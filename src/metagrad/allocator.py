"""The host memory allocator: freed memory kept for reuse instead of returned to the operating system.

On Linux, glibc's ``malloc`` serves large blocks with fresh ``mmap`` calls and gives freed memory at the top of
its heap back to the kernel (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``; both adapt up to a few tens of MiB).
A CPU meta-training step allocates and frees the same large activations every iteration (a Conv-4 5-way query
pass: 15 MiB per layer and task), so every iteration faulted its memory in again, page by page, zeroed by the
kernel: about 300,000 page faults and 0.5 s of system time in a 4.3 s step (``benchmarks/conv4.py``, one
thread). :func:`keep_freed_memory` raises both thresholds, so that memory, once used, stays in the process
and is reused: the same step then takes no page fault. The process's peak memory is what it was; what it
keeps afterwards is its peak until :func:`release_freed_memory`. PyTorch's performance guide recommends
jemalloc or TCMalloc for the same reason; this is the setting that needs nothing preloaded.

The settings are the process's, for every library in it. :class:`~metagrad.Trainer` applies them on the CPU
(``train.keep_freed_memory``, on by default), and so does ``metagrad eval``. Elsewhere than glibc (macOS,
Windows, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

__all__ = ["keep_freed_memory", "release_freed_memory"]

# mallopt's parameters (glibc's malloc.h) and its largest value (an int).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST = 2**31 - 1


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


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep the memory it frees for the next allocations: large blocks come from its
    heaps instead of an ``mmap`` each, and the heaps are not trimmed (see the module docstring). For the whole
    process, until it ends. Returns whether the settings were applied (False where the C library is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    # Trim first: a block mapped before the change is still unmapped when freed, but no new one is.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST)) & bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST))


def release_freed_memory() -> bool:
    """Give the memory that ``malloc`` holds free back to the operating system (glibc's ``malloc_trim``), for
    example after training in a notebook. Returns whether any was released (False where not glibc)."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
