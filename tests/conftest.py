"""Fixtures shared by several test modules: the real EuroSAT-MS sample as a saved pool."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="session")
def eurosat_embeddings() -> np.ndarray:
    """Real features: per-band mean and std of each EuroSAT-MS patch, standardised, L2-normed."""
    import rasterio

    feats = []
    for path in sorted((SAMPLE / "eurosat_ms").glob("*/*.tif")):
        with rasterio.open(path) as src:
            x = src.read().astype(np.float64).reshape(src.count, -1)
        feats.append(np.concatenate((x.mean(axis=1), x.std(axis=1))))
    f = np.array(feats)
    f = (f - f.mean(axis=0)) / f.std(axis=0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    assert f.shape[0] > 200
    return f.astype(np.float32)


def pip_install_target(source: Path, target: Path) -> None:
    """``pip install --no-deps --target`` with this interpreter's pip (offline when the
    build backend is already installed)."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input"]
    if importlib.util.find_spec("hatchling") is not None:
        command.append("--no-build-isolation")
    result = subprocess.run(
        [*command, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"pip could not install {source}:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def pip_install() -> Callable[[Path, Path], None]:
    """Install a distribution folder into a target folder with this interpreter's pip."""
    return pip_install_target
