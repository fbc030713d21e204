"""PatchPool on real sample data: EuroSAT-MS, EuroSAT-RGB, BigEarthNet; save, open, footprints."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from geopandas.testing import assert_geodataframe_equal
from PIL import Image
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from shapely import Point, from_wkt

import anneal_geo.data.pool as pool_module
from anneal_geo.data import (
    EUROSAT_MS_BANDS,
    RGB_BANDS,
    S2_L2A_BANDS,
    PatchPool,
    band_statistics,
    build_pool_cli_summary,
)
from anneal_geo.errors import DataError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
EUROSAT_MS = SAMPLES / "eurosat_ms"
EUROSAT_RGB = SAMPLES / "eurosat_rgb"
BIGEARTHNET = SAMPLES / "bigearthnet_s2_tiny"


@pytest.fixture(scope="module")
def ms_pool() -> PatchPool:
    return PatchPool.from_folder(EUROSAT_MS)


@pytest.fixture(scope="module")
def rgb_pool() -> PatchPool:
    return PatchPool.load(EUROSAT_RGB)


@pytest.fixture(scope="module")
def ben_pool() -> PatchPool:
    return PatchPool.load(BIGEARTHNET)


def _folder_counts(root: Path, suffix: str) -> dict[str, int]:
    return {d.name: len(list(d.glob(f"*{suffix}"))) for d in sorted(root.iterdir()) if d.is_dir()}


def _index_of(pool: PatchPool, relative: str) -> int:
    matches = [i for i, s in enumerate(pool.sources) if Path(s).as_posix().endswith(relative)]
    assert len(matches) == 1, relative
    return matches[0]


# ---------------------------------------------------------------- EuroSAT-MS


def test_eurosat_ms_pool_has_all_patches_bands_and_labels(ms_pool: PatchPool) -> None:
    assert len(ms_pool) == 283
    assert ms_pool.patches.shape == (283, 13, 64, 64)
    assert ms_pool.patches.dtype == np.uint16
    assert ms_pool.bands == list(EUROSAT_MS_BANDS)
    assert ms_pool.bands[-1] == "B8A"
    assert ms_pool.n_bands == 13 and ms_pool.patch_size == (64, 64)
    counts = _folder_counts(EUROSAT_MS, ".tif")
    assert ms_pool.class_names == sorted(counts)
    assert len(ms_pool.class_names) == 10
    assert ms_pool.class_counts() == counts
    assert ms_pool.has_labels and not ms_pool.multilabel
    assert ms_pool.labels is not None and ms_pool.labels.dtype == bool
    assert (ms_pool.labels.sum(axis=1) == 1).all()
    # Each patch's label is the folder it came from.
    single = ms_pool.single_labels()
    assert single.dtype == np.int64
    folders = [Path(s).parent.name for s in ms_pool.sources]
    assert [ms_pool.class_names[k] for k in single] == folders
    # Non-image files at the top (README.md, MANIFEST.csv) are not patches.
    assert not any(s.endswith((".md", ".csv")) for s in ms_pool.sources)


def test_eurosat_ms_files_are_in_natural_order(ms_pool: PatchPool) -> None:
    ids = [int(Path(s).stem.split("_")[-1]) for s in ms_pool.sources if "/Forest/" in s]
    assert ids == sorted(ids)
    assert len(ids) == 30


def test_values_equal_a_direct_rasterio_read(ms_pool: PatchPool) -> None:
    i = _index_of(ms_pool, "Residential/Residential_10.tif")
    with rasterio.open(EUROSAT_MS / "Residential" / "Residential_10.tif") as src:
        direct = src.read()
    np.testing.assert_array_equal(ms_pool.patches[i], direct)
    floats = ms_pool.float_patches([i, 0])
    assert floats.dtype == np.float32 and floats.shape == (2, 13, 64, 64)
    np.testing.assert_array_equal(floats[0], direct.astype(np.float32))


def test_select_bands_reorders_like_reading_bands_4_3_2(ms_pool: PatchPool) -> None:
    rgb = ms_pool.select_bands(["B04", "B03", "B02"])
    assert rgb.bands == ["B04", "B03", "B02"]
    assert rgb.patches.shape == (283, 3, 64, 64)
    i = _index_of(ms_pool, "SeaLake/SeaLake_3000.tif")
    with rasterio.open(EUROSAT_MS / "SeaLake" / "SeaLake_3000.tif") as src:
        direct = src.read(indexes=[4, 3, 2])
    np.testing.assert_array_equal(rgb.patches[i], direct)
    np.testing.assert_array_equal(rgb.band_mean, ms_pool.band_mean[[3, 2, 1]])
    np.testing.assert_array_equal(rgb.band_std, ms_pool.band_std[[3, 2, 1]])
    np.testing.assert_array_equal(rgb.labels, ms_pool.labels)
    assert rgb.fingerprint != ms_pool.fingerprint
    # B8A is stored last in the file but selected by name.
    nir = ms_pool.select_bands(["B8A"])
    with rasterio.open(EUROSAT_MS / "SeaLake" / "SeaLake_3000.tif") as src:
        np.testing.assert_array_equal(nir.patches[i, 0], src.read(13))


def test_band_statistics_equal_numpy(ms_pool: PatchPool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ms_pool.patches.astype(np.float64)
    np.testing.assert_allclose(ms_pool.band_mean, data.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(ms_pool.band_std, data.std(axis=(0, 2, 3)), rtol=1e-10)
    assert ms_pool.band_mean.dtype == np.float64
    # Force the block-wise merge (a few patches per block) and get the same numbers.
    monkeypatch.setattr(pool_module, "_BLOCK_BYTES", 3 * 13 * 64 * 64 * 8)
    mean, std = band_statistics(ms_pool.patches)
    np.testing.assert_allclose(mean, data.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, data.std(axis=(0, 2, 3)), rtol=1e-10)


def test_checksums_match_the_manifest(ms_pool: PatchPool) -> None:
    with open(EUROSAT_MS / "MANIFEST.csv", newline="") as fh:
        manifest = {row["file"]: row["sha256"] for row in csv.DictReader(fh)}
    assert ms_pool.source_sha256 is not None
    got = {
        Path(s).relative_to(EUROSAT_MS).as_posix(): h
        for s, h in zip(ms_pool.sources, ms_pool.source_sha256, strict=True)
    }
    assert got == manifest


def test_footprints_keep_each_crs_and_contain_the_centre(ms_pool: PatchPool) -> None:
    fp = ms_pool.footprints
    assert fp is not None
    assert list(fp.columns) == [
        "patch_id", "source", "crs", "row_off", "col_off", "height", "width", "label",
        "geometry_native", "geometry",
    ]  # fmt: skip
    assert fp.crs.to_epsg() == 4326
    assert list(fp["patch_id"]) == list(range(283))
    assert fp["crs"].nunique() > 1  # several UTM zones, each kept
    assert ms_pool.footprints is fp  # cached
    for row in fp.itertuples():
        with rasterio.open(row.source) as src:
            assert row.crs == f"EPSG:{src.crs.to_epsg()}"
            cx = (src.bounds.left + src.bounds.right) / 2
            cy = (src.bounds.bottom + src.bounds.top) / 2
            lon, lat = warp_transform(src.crs, "EPSG:4326", [cx], [cy])
            native = from_wkt(row.geometry_native)
            np.testing.assert_allclose(native.bounds, tuple(src.bounds), atol=1e-6)
        assert row.geometry.contains(Point(lon[0], lat[0]))
        assert (row.height, row.width, row.row_off, row.col_off) == (64, 64, 0, 0)
        assert row.label == Path(row.source).parent.name
    # EuroSAT lies in Europe.
    minx, miny, maxx, maxy = fp.total_bounds
    assert -15 < minx < maxx < 40 and 30 < miny < maxy < 70


def test_rgb_composite_stretches_b04_b03_b02(ms_pool: PatchPool) -> None:
    i = _index_of(ms_pool, "Industrial/Industrial_1.tif")
    image = ms_pool.rgb(i)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    red = ms_pool.patches[i, ms_pool.bands.index("B04")].astype(np.float64)
    low, high = np.percentile(red, [2, 98])
    expected = np.clip((red - low) / (high - low), 0, 1) * 255
    assert np.abs(image[..., 0].astype(np.float64) - expected).max() <= 1.0


def test_save_and_open_round_trip_never_reads_rasters(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for name in ["Forest", "River", "SeaLake", "README.md", "MANIFEST.csv"]:
        src = EUROSAT_MS / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, archive / name)
    built = PatchPool.load(archive)
    assert len(built) == 30 + 27 + 31
    first_source = Path(built.sources[0])
    expected_sha = hashlib.sha256(first_source.read_bytes()).hexdigest()
    out = built.save(tmp_path / "pool")
    assert out == tmp_path / "pool" and built.path == out
    assert {p.name for p in out.iterdir()} == {
        "pool.json", "patches.npy", "labels.npy", "footprints.gpkg",
    }  # fmt: skip
    meta = json.loads((out / "pool.json").read_text())
    assert (meta["format"], meta["version"]) == ("anneal-geo-pool", 1)
    assert meta["bands"] == list(EUROSAT_MS_BANDS)
    assert meta["shape"] == [88, 13, 64, 64]
    assert meta["sources"] == built.sources
    assert meta["sha256"][0] == expected_sha
    assert meta["crs"] == built.source_crs and meta["crs"][0].startswith("EPSG:326")
    assert meta["created"]

    # The archive disappears: opening must not need it.
    archive.rename(tmp_path / "archive-moved")
    opened = PatchPool.load(out)  # auto-detects the pool directory
    assert isinstance(opened.patches, np.memmap)
    assert opened.path == out
    np.testing.assert_array_equal(opened.patches, built.patches)
    np.testing.assert_array_equal(opened.labels, built.labels)
    assert opened.bands == built.bands and opened.class_names == built.class_names
    assert opened.sources == built.sources and opened.source_sha256 == built.source_sha256
    np.testing.assert_array_equal(opened.band_mean, built.band_mean)
    np.testing.assert_array_equal(opened.band_std, built.band_std)
    assert opened.fingerprint == built.fingerprint
    assert_geodataframe_equal(opened.footprints, built.footprints)
    same = opened.select_bands(opened.bands)
    assert same.patches is opened.patches and same.fingerprint == opened.fingerprint
    # Only now does anything look at the sources: all are gone.
    assert opened.check_sources() == built.sources


def test_fingerprint_ignores_how_the_root_is_spelled(tmp_path: Path) -> None:
    archive = tmp_path / "a"
    shutil.copytree(EUROSAT_MS / "River", archive / "River")
    absolute = PatchPool.from_folder(archive)
    shutil.move(archive, tmp_path / "b")
    moved = PatchPool.from_folder(tmp_path / "b" / ".." / "b")
    assert absolute.sources != moved.sources
    assert absolute.fingerprint == moved.fingerprint
    assert len(absolute.fingerprint) == 16


def test_describe_summarises_the_pool(ms_pool: PatchPool) -> None:
    text = build_pool_cli_summary(ms_pool)
    assert text == ms_pool.describe()
    assert "283" in text and "B8A" in text and "64 x 64" in text and "uint16" in text
    assert "SeaLake: 31" in text and "EPSG:32631" in text


# ---------------------------------------------------------------- EuroSAT-RGB


def test_eurosat_rgb_pool(rgb_pool: PatchPool) -> None:
    assert len(rgb_pool) == 1000
    assert rgb_pool.patches.shape == (1000, 3, 64, 64)
    assert rgb_pool.patches.dtype == np.uint8
    assert rgb_pool.bands == list(RGB_BANDS)
    assert rgb_pool.footprints is None
    assert rgb_pool.source_crs == [None] * 1000
    assert rgb_pool.class_counts() == _folder_counts(EUROSAT_RGB, ".jpg")
    name = min((EUROSAT_RGB / "Pasture").glob("*.jpg")).name
    i = _index_of(rgb_pool, f"Pasture/{name}")
    pixels = np.asarray(Image.open(EUROSAT_RGB / "Pasture" / name).convert("RGB"))
    np.testing.assert_array_equal(rgb_pool.patches[i], pixels.transpose(2, 0, 1))


def test_rgb_pool_without_footprints_round_trips(rgb_pool: PatchPool, tmp_path: Path) -> None:
    small = PatchPool(
        rgb_pool.patches[:20],
        rgb_pool.bands,
        class_names=rgb_pool.class_names,
        labels=rgb_pool.labels[:20] if rgb_pool.labels is not None else None,
        sources=rgb_pool.sources[:20],
    )
    out = small.save(tmp_path / "rgbpool")
    assert not (out / "footprints.gpkg").exists()
    opened = PatchPool.open(out)
    assert opened.footprints is None
    np.testing.assert_array_equal(opened.patches, small.patches)


# ---------------------------------------------------------------- BigEarthNet


def test_bigearthnet_pool_is_multilabel_on_the_10m_grid(ben_pool: PatchPool) -> None:
    assert len(ben_pool) == 11
    assert ben_pool.patches.shape == (11, 12, 120, 120)
    assert ben_pool.patches.dtype == np.float32
    assert ben_pool.bands == list(S2_L2A_BANDS)
    assert "B10" not in ben_pool.bands and ben_pool.bands.index("B8A") == 8
    assert ben_pool.multilabel and ben_pool.labels is not None
    all_labels: set[str] = set()
    for i, source in enumerate(ben_pool.sources):
        folder = Path(source)
        meta = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        all_labels.update(meta["labels"])
        got = [ben_pool.class_names[j] for j in np.flatnonzero(ben_pool.labels[i])]
        assert got == sorted(meta["labels"])
    assert ben_pool.class_names == sorted(all_labels)
    with pytest.raises(DataError, match="multi-label"):
        ben_pool.single_labels()


def test_bigearthnet_bands_are_resampled_from_their_files(ben_pool: PatchPool) -> None:
    folder = Path(ben_pool.sources[3])
    with rasterio.open(folder / f"{folder.name}_B02.tif") as src:
        np.testing.assert_array_equal(ben_pool.patches[3, 1], src.read(1).astype(np.float32))
        crs = f"EPSG:{src.crs.to_epsg()}"
    with rasterio.open(folder / f"{folder.name}_B05.tif") as src:
        coarse = src.read(1).astype(np.float64)
    fine = ben_pool.patches[3, ben_pool.bands.index("B05")].astype(np.float64)
    # Each 20 m pixel becomes a 2x2 block whose average is close to the original value.
    blocks = fine.reshape(60, 2, 60, 2).mean(axis=(1, 3))
    assert np.abs(blocks[5:-5, 5:-5] - coarse[5:-5, 5:-5]).mean() < 0.15 * coarse.std()
    assert abs(fine.mean() - coarse.mean()) < 0.01 * coarse.mean()
    fp = ben_pool.footprints
    assert fp is not None and fp.loc[3, "crs"] == crs
    assert (fp["height"] == 120).all()


# ---------------------------------------------------------------- other inputs


def _write_tif(path: Path, data: np.ndarray, descriptions: list[str] | None = None) -> None:
    profile = {
        "driver": "GTiff", "count": data.shape[0], "height": data.shape[1],
        "width": data.shape[2], "dtype": data.dtype.name, "crs": "EPSG:32631",
        "transform": from_origin(500000, 5000000, 10, 10),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for k, text in enumerate(descriptions or [], start=1):
            dst.set_band_description(k, text)


def test_band_names_from_descriptions_count_or_argument(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    described = tmp_path / "described" / "A"
    described.mkdir(parents=True)
    _write_tif(
        described / "x_1.tif", rng.integers(0, 9, (3, 8, 8), dtype=np.uint16), ["B8", "b4", "B11"]
    )
    assert PatchPool.from_folder(described.parent).bands == ["B08", "B04", "B11"]

    twelve = tmp_path / "twelve" / "A"
    twelve.mkdir(parents=True)
    _write_tif(twelve / "x_1.tif", rng.integers(0, 9, (12, 8, 8), dtype=np.uint16))
    assert PatchPool.from_folder(twelve.parent).bands == list(S2_L2A_BANDS)

    custom = PatchPool.from_folder(described.parent, bands=["nir", "red", "swir"])
    assert custom.bands == ["nir", "red", "swir"]


def test_flat_folder_gives_an_unlabelled_pool(tmp_path: Path) -> None:
    for name in ["River_1.tif", "River_2.tif", "River_10.tif"]:
        shutil.copy(EUROSAT_MS / "River" / name, tmp_path / name)
    pool = PatchPool.load(tmp_path)
    assert len(pool) == 3 and not pool.has_labels and pool.labels is None
    assert [Path(s).name for s in pool.sources] == ["River_1.tif", "River_2.tif", "River_10.tif"]
    with pytest.raises(DataError, match="no labels"):
        pool.single_labels()
    out = pool.save(tmp_path / "pool")
    assert not (out / "labels.npy").exists()
    opened = PatchPool.open(out)
    assert opened.labels is None and opened.footprints is not None
    assert opened.footprints["label"].isna().all()


def test_pool_from_arrays_accepts_class_indices() -> None:
    rng = np.random.default_rng(1)
    patches = rng.random((4, 2, 5, 5), dtype=np.float32)
    pool = PatchPool(patches, ["B04", "B08"], class_names=["a", "b"], labels=np.array([0, 1, 1, 0]))
    np.testing.assert_array_equal(pool.single_labels(), [0, 1, 1, 0])
    assert pool.footprints is None
    assert pool.rgb(2).shape == (5, 5, 3)
    with pytest.raises(DataError, match="out of range"):
        pool.float_patches([4])
