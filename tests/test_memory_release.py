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
