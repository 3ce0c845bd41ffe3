"""Process settings that change speed, not results.

glibc's malloc serves every block above 128 KiB with a fresh mmap and gives freed heap memory
back to the kernel, so each step of a training loop page-faults its [B, N, K] k-space tables
and trunk buffers in again. Measured with `benchmarks/training_step.py` (4 × 64-ion NaCl
cells, one thread): the `sr` step took 83 ms with the settings below against 115 ms without,
and the `les` step 113 ms against 208 ms. PyTorch's CPU tuning guide gives the same advice
(jemalloc or tcmalloc); this needs no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit systems (32 MiB).
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8
_done = False


def tune_allocator() -> bool:
    """Keep freed memory in the process (no trimming, no mmap below 32 MiB). Idempotent; a
    no-op returning False where the C library is not glibc. Costs resident memory that was
    already used once, never more than the peak."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("tune_allocator: no glibc mallopt here; allocator left as it is")
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    _done = ok
    return ok
