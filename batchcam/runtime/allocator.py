"""glibc's malloc told to keep freed memory for the next batch instead of giving it back.

A ResNet18 forward pass on a batch of 32 allocates and frees activations of tens of megabytes. By default
glibc serves such blocks with ``mmap`` (above a threshold that starts at 128 KB) and trims freed
heap memory back to the kernel, so every batch faults the same pages in again. Raising the mmap
threshold to glibc's maximum (32 MB) and the trim threshold to 1 GB keeps those blocks in the heap,
where the next batch reuses them. The cost is that the heap holds a batch's activations between
batches. benchmarks/RESULTS.md ("Where the time goes") has the measured faults, kernel time and
peak RSS; the benchmark's 200 vs 5,000 image scans check that memory stays flat.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024          # glibc refuses more on 64-bit machines
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune this process's allocator (and that of processes it forks later); False where it is
    not glibc (macOS, musl), which is left as it is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Give the memory glibc's malloc holds free back to the kernel (``malloc_trim``); False where
    it is not glibc. For a long-lived process whose peak is passing (serve after a request)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))
