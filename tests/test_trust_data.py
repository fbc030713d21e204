"""Data named at the door: BigEarthNet read as BigEarthNet by `pool build`, corrupt label
files and NaN rasters named when the pool is built, an index bound to its pool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from anneal_geo.data.pool import PatchPool
from anneal_geo.errors import DataError
from anneal_geo.retrieval.geoindex import GeoIndex, build_index

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"
SAMPLE = ROOT / "sample_tiles"
BIGEARTHNET = SAMPLE / "bigearthnet_s2_tiny"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for part in parts:
        assert part in message, message
    return message


# -- BigEarthNet -------------------------------------------------------------------------------


def test_pool_build_reads_a_bigearthnet_folder_as_bigearthnet(tmp_path):
    out = tmp_path / "pool"
    result = cli("pool", "build", str(BIGEARTHNET), "--out", str(out))
    assert result.returncode == 0, result.stderr
    built, expected = PatchPool.open(out), PatchPool.load(BIGEARTHNET)
    assert built.patches.shape == expected.patches.shape == (11, 12, 120, 120)
    assert built.multilabel and built.class_names == expected.class_names
    np.testing.assert_array_equal(built.labels, expected.labels)
    assert built.fingerprint == expected.fingerprint
    cut = cli("pool", "build", str(BIGEARTHNET), "--patch-size", "64", "--out", str(out))
    one_line_error(cut, "is a BigEarthNet folder", "--patch-size")


def test_a_corrupt_bigearthnet_label_file_is_named(tmp_path):
    folder = tmp_path / "ben"
    shutil.copytree(BIGEARTHNET, folder)
    label = sorted(folder.glob("*/*_labels_metadata.json"))[3]
    label.write_text('{"labels": ["Pastures", ', encoding="utf-8")
    one_line_error(
        cli("pool", "build", str(folder), "--out", str(tmp_path / "pool")),
        str(label),
        "not a BigEarthNet label file",
    )
    assert not (tmp_path / "pool" / "pool.json").exists()


# -- NaN in float rasters ----------------------------------------------------------------------


def read(path: str | Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def float_archive(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Real EuroSAT-MS patches as float32 GeoTIFFs (reflectance), two of them with NaN
    pixels, as a processing chain that writes float rasters leaves them."""
    root = tmp_path_factory.mktemp("float") / "archive"
    with_nan = []
    for cls in ("Forest", "River", "Highway"):
        (root / cls).mkdir(parents=True)
        for k, source in enumerate(sorted((SAMPLE / "eurosat_ms" / cls).glob("*.tif"))[:4]):
            with rasterio.open(source) as src:
                data, profile = src.read().astype(np.float32) / 10000.0, src.profile
            if cls != "Forest" and k == 1:
                data[:, 10:14, 20:30] = np.nan  # a cloud mask written as NaN
                with_nan.append(root / cls / source.name)
            profile.update(dtype="float32", nodata=None)
            with rasterio.open(root / cls / source.name, "w", **profile) as dst:
                dst.write(data)
    return root, with_nan


def test_nan_in_float_rasters_is_reported_at_pool_build_naming_the_files(float_archive, tmp_path):
    root, with_nan = float_archive
    message = one_line_error(
        cli("pool", "build", str(root), "--out", str(tmp_path / "pool")),
        "2 patches hold NaN pixels",
        "--nan-as-nodata",
    )
    for path in with_nan:
        assert str(path) in message
    assert not (tmp_path / "pool").exists() or not (tmp_path / "pool" / "pool.json").exists()
    with pytest.raises(DataError, match="nan_as_nodata=True"):
        PatchPool.load(root)
    # `run` on the folder stops at the same place, before a session exists.
    run = cli("run", "--data", str(root), "--rounds", "0", "--initial", "4", "--out",
              str(tmp_path / "session"))  # fmt: skip
    one_line_error(run, "NaN pixels", str(with_nan[0]))
    assert not (tmp_path / "session").exists()


def test_nan_as_nodata_fills_nan_with_the_band_mean(float_archive, tmp_path):
    root, _ = float_archive
    out = tmp_path / "pool"
    result = cli("pool", "build", str(root), "--nan-as-nodata", "--out", str(out))
    assert result.returncode == 0, result.stderr
    pool = PatchPool.open(out)
    assert np.isfinite(pool.patches).all() and np.isfinite(pool.band_mean).all()
    raw = PatchPool.from_folder(root, nan_as_nodata=True)
    np.testing.assert_array_equal(raw.patches, np.asarray(pool.patches))
    # Valid pixels are untouched; the filled ones carry each band's mean of valid pixels.
    reference = np.stack([read(source) for source in raw.sources])
    valid = np.isfinite(reference)
    np.testing.assert_array_equal(raw.patches[valid], reference[valid])
    band_mean = np.nanmean(reference, axis=(0, 2, 3))
    filled = raw.patches[~valid].reshape(-1)
    channels = np.nonzero(~valid)[1]
    np.testing.assert_allclose(filled, band_mean[channels], rtol=1e-5)


# -- an index and its pool ---------------------------------------------------------------------


def test_an_index_copied_next_to_another_pool_is_refused(tmp_path, pool_dir):
    first = tmp_path / "first"
    shutil.copytree(pool_dir, first)
    build_index(first)
    other = tmp_path / "other"
    PatchPool.load(BIGEARTHNET).save(other)
    for name in ("index.faiss", "index.json"):
        shutil.copy(first / name, other / name)
    assert json.loads((other / "index.json").read_text())["pool_dir"] == str(first.resolve())
    with pytest.raises(DataError, match="built from another pool"):
        GeoIndex.load(other)
    one_line_error(cli("query", str(other), "--patch", "0"), "built from another pool")
    # The same pool moved elsewhere keeps its fingerprint, so its index still works there.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    assert len(GeoIndex.load(moved).query_patch(0, k=3)) == 3
