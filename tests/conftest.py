"""Fixtures shared by several test modules: the real EuroSAT-MS sample as a saved pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from anneal_geo.data.pool import PatchPool

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 283-patch EuroSAT-MS sample saved as a pool directory (built once per run)."""
    directory = tmp_path_factory.mktemp("shared") / "eurosat_ms_pool"
    PatchPool.load(SAMPLE / "eurosat_ms").save(directory)
    return directory


@pytest.fixture(scope="session")
def pool(pool_dir: Path) -> PatchPool:
    return PatchPool.open(pool_dir)
