"""Give freed tensor memory back to the system (glibc), so a fine-tuning's RSS tracks what it holds.

PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold (128 KiB
at start) with its own mapping, returned on free, but it raises that threshold to the size of
each such block freed (up to 32 MiB: mallopt(3), M_MMAP_THRESHOLD, "dynamic threshold"). After
the first step every activation comes from the heap, which fragments and never shrinks: measured
on MiniLM (docs/finetuning.md, "Peak memory"), LoRA's peak RSS was 2.3x its live tensors' peak
(torch.profiler), full fine-tuning's 1.5x, and the two peaked at about the same RSS. Setting the
threshold fixes it at its initial value and turns the adjustment off, as MALLOC_MMAP_THRESHOLD_
does from the environment (which, when set, is left as the user chose).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 128 * 1024  # glibc's own initial threshold (DEFAULT_MMAP_THRESHOLD_MIN)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (Linux with glibc only); True if it was set here."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # musl and others: no mallopt, nothing to do
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
