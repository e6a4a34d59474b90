"""Process-wide allocator settings for model-serving processes."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit hosts
MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory(threshold_bytes: int = MAX_MMAP_THRESHOLD) -> bool:
    """Serve allocations of up to `threshold_bytes` from malloc's heaps instead of fresh mmaps,
    and keep freed heap memory instead of returning it to the OS.

    A decode step allocates and frees buffers of the same sizes every step. With glibc's
    defaults, an attention worker's step thread (not the main thread, so not the main arena) got
    many of them back as fresh pages and faulted them in again: 7.5 ms of kernel time per
    batch-16 step of a compiled worker here, 1.1-1.4 ms with this. The cost is memory the process
    keeps after a peak. Returns whether the C library took the settings (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold_bytes))
