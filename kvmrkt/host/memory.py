"""Keeping a long-lived kvmrkt process small: glibc's allocator told to give freed memory back to the host.

Role: ``kvmrkt run`` supervises its pod for the pod's whole life, so what its launch allocated and freed must not
stay resident. ``lean()`` (called before the launch) fixes glibc's mmap threshold at its default 128 KiB: glibc
otherwise raises it to the size of the largest block freed (the 1 MiB chunks of every file hash), after which such
blocks come from the heap and thread arenas and stay there once freed. ``release()`` (called once the VM runs)
collects garbage and returns the free pages of every arena (``malloc_trim``). Where the C library has neither
call (not glibc), both do nothing. Trust boundary: none (this process's own allocator).
"""

from __future__ import annotations

import ctypes
import gc

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h); setting either fixes the mmap threshold too
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 128 * 1024  # glibc's defaults for both


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def lean() -> None:
    """Keep large blocks out of the heap: allocated by mmap and unmapped when freed (glibc's own default)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)


def release() -> None:
    """Free what is garbage and give the allocator's free pages back (a long wait follows)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
