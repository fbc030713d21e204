"""Freed heap memory goes back to the system after the engine's large temporary steps."""

from __future__ import annotations

import sys

import numpy as np
import psutil
import pytest

from anneal_geo._memory import release_free_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_blocks_are_returned() -> None:
    process = psutil.Process()
    # 3,000 blocks of 64 KB come from the heap (below glibc's mmap threshold); one block
    # allocated after them pins the heap's top, so freeing the rest returns nothing by itself.
    blocks = [np.ones(8192) for _ in range(3000)]
    pin = np.ones(8192)
    del blocks
    before = process.memory_info().rss
    assert release_free_memory() is True
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, (before, after)
    assert pin.sum() == 8192


def test_release_is_harmless_when_nothing_is_free() -> None:
    first = release_free_memory()
    assert release_free_memory() is first


_CACHE_PROBE = """
import json, sys
from rasterio.env import get_gdal_config
from anneal_geo.data.pool import PatchPool
before = int(get_gdal_config("GDAL_CACHEMAX"))
pool = PatchPool.from_tiles(sys.argv[1], 64, bands=["B02", "B03"], progress=False)
pool.patches[[0, 5]]
print(json.dumps([before, int(get_gdal_config("GDAL_CACHEMAX")), len(pool)]))
"""


@pytest.mark.parametrize("chosen", [None, "300"])
def test_reading_tiles_caps_gdal_block_cache_unless_chosen(chosen: str | None) -> None:
    import json
    import os
    import subprocess
    from pathlib import Path

    from anneal_geo._memory import GDAL_CACHE_BYTES

    cell = next((Path(__file__).parents[1] / "sample_tiles").rglob("B02.tif")).parent
    env = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    if chosen is not None:
        env["GDAL_CACHEMAX"] = chosen  # megabytes, as GDAL reads it
    done = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, str(cell)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    before, after, patches = json.loads(done.stdout.strip().splitlines()[-1])
    assert patches > 0
    if chosen is None:
        assert after == min(before, GDAL_CACHE_BYTES)
    else:
        assert before == after == 300 * 2**20
