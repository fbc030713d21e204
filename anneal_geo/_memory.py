"""Handing freed heap memory back to the operating system.

Reading hundreds of thousands of tile windows, computing features in chunks and scoring
millions of candidate pairs allocate and free many medium-sized buffers, much of it in
reader threads. glibc's allocator keeps such freed memory in its arenas for reuse instead of
returning it, so a process that has finished the feature step of a million-patch pool holds
about 0.9 GB it no longer uses (measured: 565 MB of 2,154 MB after the features of 210,000
patches). :func:`release_free_memory` asks glibc to give it back (``malloc_trim``); the
engine calls it after its large, temporary steps. Elsewhere (macOS, Windows, musl) it does
nothing.

GDAL keeps decoded raster blocks in a cache of its own, by default up to 5 % of the
machine's memory (1.15 GB on a 23 GB laptop). Reading tiles patch row by patch row reuses a
few megabytes of blocks at a time, so :func:`cap_gdal_cache` lowers it to
:data:`GDAL_CACHE_BYTES` before anneal-geo reads tiles, unless ``GDAL_CACHEMAX`` is set in
the environment (then that value stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.errors import DataError


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


#: GDAL's block cache while anneal-geo reads tiles (see the module docs). Reading 100,000
#: patches of a tiles-store pool peaked at 443 MB with it, at 602 MB with GDAL's default,
#: in the same time.
GDAL_CACHE_BYTES = 128 * 2**20


@functools.cache
def cap_gdal_cache() -> None:
    """Lower GDAL's block cache to :data:`GDAL_CACHE_BYTES` (never raise it), unless the
    environment sets ``GDAL_CACHEMAX``. Process-wide, like GDAL's own setting, and done
    once: every tile read calls it, and later calls return at once."""
    if "GDAL_CACHEMAX" in os.environ:
        return
    from rasterio.env import get_gdal_config, set_gdal_config

    if int(get_gdal_config("GDAL_CACHEMAX")) > GDAL_CACHE_BYTES:
        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)


def npy_row_blocks(
    path: Path, rows: int, remedy: str
) -> tuple[tuple[int, int], Iterator[np.ndarray]]:
    """The (N, D) shape of a saved float32 ``.npy`` matrix and its rows, ``rows`` at a time.

    Plain reads, not a memory map: the pages of a mapped file count as the process's own
    memory while they stay mapped, so a mapped 1 GB file read to its end holds 1 GB. Each
    block is a new array. A file that is not such a matrix, or that ends early (raised
    while its blocks are read), is a one-line :class:`DataError` ending in ``remedy``.
    """
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as a .npy array ({exc}); {remedy}") from exc
    if len(shape) != 2 or fortran or dtype != np.float32:
        raise DataError(
            f"{path} holds {shape} {dtype}{' (Fortran order)' if fortran else ''}; "
            f"expected an (N, D) float32 matrix; {remedy}"
        )
    n, dim = int(shape[0]), int(shape[1])

    def read() -> Iterator[np.ndarray]:
        with path.open("rb") as handle:
            handle.seek(offset)
            for start in range(0, n, rows):
                count = min(rows, n - start)
                block = np.fromfile(handle, dtype=np.float32, count=count * dim)
                if block.size != count * dim:
                    raise DataError(f"{path} ends before its {n} rows; {remedy}")
                yield block.reshape(count, dim)

    return (n, dim), read()
