"""Keep large, short-lived buffers from pinning memory (glibc malloc on Linux).

The embedded backend saves and restores sessions' states as buffers of several MiB.
glibc raises its mmap threshold to the size of each such buffer freed, so the next ones
come from the heap, where freed space stays resident: RSS then creeps above what the
state budget allows (bench/soak.py; BENCHMARKS.md). A fixed threshold keeps every
buffer of 1 MiB or more in its own mapping, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: mallopt(3) parameter numbers (glibc malloc.h).
M_MMAP_THRESHOLD = -3
#: Buffers this large or larger get mappings of their own.
MMAP_THRESHOLD_BYTES = 1 << 20


def release_large_buffers() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; False where that is not glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return done
