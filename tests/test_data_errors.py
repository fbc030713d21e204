"""Bad input gives one-line DataErrors that name the file (or band) and say what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from anneal_geo.data import PatchPool
from anneal_geo.errors import DataError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
EUROSAT_MS = SAMPLES / "eurosat_ms"
BIGEARTHNET = SAMPLES / "bigearthnet_s2_tiny"


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small class-folder archive of real EuroSAT-MS files."""
    root = tmp_path / "archive"
    for cls, ids in [("Forest", [1, 2]), ("River", [1, 2])]:
        (root / cls).mkdir(parents=True)
        for i in ids:
            shutil.copy(EUROSAT_MS / cls / f"{cls}_{i}.tif", root / cls)
    shutil.copy(EUROSAT_MS / "README.md", root)
    return root


def _write_tif(path: Path, count: int, size: int, dtype: str = "uint16") -> None:
    data = np.random.default_rng(0).integers(0, 1000, (count, size, size)).astype(dtype)
    profile = {
        "driver": "GTiff", "count": count, "height": size, "width": size, "dtype": dtype,
        "crs": "EPSG:32631", "transform": from_origin(500000, 5000000, 10, 10),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_the_archive_fixture_is_valid(archive: Path) -> None:
    assert len(PatchPool.from_folder(archive)) == 4


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(empty)
    text = _one_line(exc)
    assert str(empty) in text and "subfolder" in text


def test_folder_with_only_non_images_and_empty_class_folder(tmp_path: Path) -> None:
    (tmp_path / "Forest").mkdir()
    (tmp_path / "README.md").write_text("not a patch")
    (tmp_path / "Forest" / "notes.txt").write_text("not a patch either")
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(tmp_path)
    assert str(tmp_path) in _one_line(exc)
    with pytest.raises(DataError) as exc:
        PatchPool.load(tmp_path)
    text = _one_line(exc)
    assert "pool.json" in text and "BigEarthNet" in text and "class-folder" in text


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        PatchPool.load(tmp_path / "nowhere")
    assert "nowhere" in _one_line(exc)


def test_file_that_is_not_an_image(archive: Path) -> None:
    bad = archive / "River" / "River_3.tif"
    bad.write_text("this is text, not a GeoTIFF\n")
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive)
    text = _one_line(exc)
    assert str(bad) in text and "remove it" in text


def test_truncated_geotiff(archive: Path) -> None:
    bad = archive / "Forest" / "Forest_2.tif"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive)
    text = _one_line(exc)
    assert str(bad) in text and "truncated" in text


def test_patch_of_another_size(archive: Path) -> None:
    odd = archive / "River" / "River_99.tif"
    _write_tif(odd, count=13, size=32)
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive)
    text = _one_line(exc)
    assert str(odd) in text and "32x32" in text and "64x64" in text


def test_patch_with_another_band_count(archive: Path) -> None:
    odd = archive / "River" / "River_98.tif"
    _write_tif(odd, count=4, size=64)
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive)
    text = _one_line(exc)
    assert str(odd) in text and "4 bands" in text and "13 bands" in text


def test_image_next_to_class_folders(archive: Path) -> None:
    stray = archive / "Forest_7.tif"
    shutil.copy(archive / "Forest" / "Forest_1.tif", stray)
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive)
    assert str(stray) in _one_line(exc)


def test_unknown_band_count_asks_for_bands(tmp_path: Path) -> None:
    (tmp_path / "A").mkdir()
    five = tmp_path / "A" / "x.tif"
    _write_tif(five, count=5, size=8)
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(tmp_path)
    text = _one_line(exc)
    assert str(five) in text and "bands=" in text
    assert PatchPool.from_folder(tmp_path, bands=["B02", "B03", "B04", "B08", "B11"]).n_bands == 5


def test_bands_argument_must_match_band_count(archive: Path) -> None:
    with pytest.raises(DataError) as exc:
        PatchPool.from_folder(archive, bands=["B04", "B03", "B02"])
    text = _one_line(exc)
    assert "3 names" in text and "13 bands" in text and "Forest_1.tif" in text
    with pytest.raises(DataError, match="repeats B01"):
        PatchPool.from_folder(archive, bands=["B01"] * 13)


def test_select_unknown_band(archive: Path) -> None:
    pool = PatchPool.from_folder(archive)
    with pytest.raises(DataError) as exc:
        pool.select_bands(["B04", "B13"])
    text = _one_line(exc)
    assert "'B13'" in text and "B01" in text and "B8A" in text
    with pytest.raises(DataError, match="twice"):
        pool.select_bands(["B04", "B4"])


def test_unwritable_output_directory(archive: Path, tmp_path: Path) -> None:
    pool = PatchPool.from_folder(archive)
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file, so nothing can be created beneath it")
    target = blocker / "pool"
    with pytest.raises(DataError) as exc:
        pool.save(target)
    text = _one_line(exc)
    assert str(target) in text and "writable" in text
    assert not target.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_system_directory(archive: Path) -> None:
    pool = PatchPool.from_folder(archive)
    with pytest.raises(DataError) as exc:
        pool.save("/proc/anneal-pool")
    assert "/proc/anneal-pool" in _one_line(exc)


def test_pool_json_of_another_version(archive: Path, tmp_path: Path) -> None:
    out = PatchPool.from_folder(archive).save(tmp_path / "pool")
    meta_path = out / "pool.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError) as exc:
        PatchPool.open(out)
    text = _one_line(exc)
    assert str(meta_path) in text and "99" in text and "rebuild" in text
    meta["version"], meta["format"] = 1, "something-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="something-else"):
        PatchPool.load(out)


def test_open_a_folder_that_is_not_a_pool(archive: Path) -> None:
    with pytest.raises(DataError) as exc:
        PatchPool.open(archive)
    assert "pool.json" in _one_line(exc)


def test_damaged_patches_file(archive: Path, tmp_path: Path) -> None:
    out = PatchPool.from_folder(archive).save(tmp_path / "pool")
    np.save(out / "patches.npy", np.zeros((2, 13, 64, 64), dtype=np.uint16))
    with pytest.raises(DataError) as exc:
        PatchPool.open(out)
    assert "patches.npy" in _one_line(exc)


def test_bigearthnet_patch_missing_a_band(tmp_path: Path) -> None:
    name = "S2B_MSIL2A_20170924T093019_43_47"
    folder = tmp_path / "ben" / name
    shutil.copytree(BIGEARTHNET / name, folder)
    (folder / f"{name}_B8A.tif").unlink()
    with pytest.raises(DataError) as exc:
        PatchPool.load(tmp_path / "ben")
    text = _one_line(exc)
    assert str(folder) in text and "B8A" in text


def test_bigearthnet_malformed_labels(tmp_path: Path) -> None:
    name = "S2B_MSIL2A_20170924T093019_43_47"
    folder = tmp_path / "ben" / name
    shutil.copytree(BIGEARTHNET / name, folder)
    label_file = folder / f"{name}_labels_metadata.json"
    label_file.write_text("{not json")
    with pytest.raises(DataError) as exc:
        PatchPool.from_bigearthnet(tmp_path / "ben")
    assert str(label_file) in _one_line(exc)


def test_single_label_pool_rejects_two_labels_per_patch() -> None:
    patches = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    labels = np.array([[True, True], [True, False]])
    with pytest.raises(DataError, match="patch 0 has 2 labels"):
        PatchPool(patches, ["B04"], class_names=["a", "b"], labels=labels)
