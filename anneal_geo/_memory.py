"""Handing freed heap memory back to the operating system.

Reading hundreds of thousands of tile windows, computing features in chunks and scoring
millions of candidate pairs allocate and free many medium-sized buffers, much of it in
reader threads. glibc's allocator keeps such freed memory in its arenas for reuse instead of
returning it, so a process that has finished the feature step of a million-patch pool holds
about 0.9 GB it no longer uses (measured: 565 MB of 2,154 MB after the features of 210,000
patches). :func:`release_free_memory` asks glibc to give it back (``malloc_trim``); the
engine calls it after its large, temporary steps. Elsewhere (macOS, Windows, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is none (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; True when the allocator supports it
    (glibc), False where it does nothing. Safe to call at any time, from any thread."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
