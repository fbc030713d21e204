"""Fixtures shared by several test modules: the real EuroSAT-MS sample as a saved pool, and
the Major TOM cell as two masked scenes."""

from __future__ import annotations

import importlib.util
import shutil
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
def masked_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two scenes of the Major TOM cell: its B04 and B08 with a drawn cloud in the mask, and a
    two-band GeoTIFF of them with nodata 0 and a nodata wedge (read through rasterio's merge,
    as TorchGeo does, since its pixels can be masked). Copies: tests only read them."""
    import rasterio

    cell = SAMPLE / "majortom_s2l2a_tile" / "199U" / "199U_1099R"
    source = next(cell.iterdir())
    root = tmp_path_factory.mktemp("masked")
    product = root / "a" / "product"
    product.mkdir(parents=True)
    for band in ("B04", "B08"):
        shutil.copy2(source / f"{band}.tif", product / f"{band}.tif")
    with rasterio.open(source / "cloud_mask.tif") as src:
        profile, mask = src.profile, src.read(1)
    mask[600:900, 100:700] = 1
    with rasterio.open(product / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    stack = []
    for band in ("B04", "B08"):
        with rasterio.open(source / f"{band}.tif") as src:
            stack.append(src.read(1))
            profile = src.profile
    data = np.stack(stack)
    rows, cols = np.indices(data.shape[1:])
    data[:, rows + cols < 500] = 0
    profile.update(count=2, nodata=0)
    (root / "b").mkdir()
    with rasterio.open(root / "b" / "scene.tif", "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = ("B04", "B08")
    return root


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
