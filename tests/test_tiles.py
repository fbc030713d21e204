"""Tile archives through TorchGeo on the real Major TOM cell: grids, exact footprints, band
resampling, UTM zones kept apart, nodata and cloud skipping, bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from anneal_geo.data.footprints import COLUMNS
from anneal_geo.data.pool import PatchPool
from anneal_geo.data.tiles import (
    IngestReport,
    find_scenes,
    is_tile_archive,
    patch_grid,
    read_tiles,
)
from anneal_geo.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
CELL = SAMPLE / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
TEN_M = ["B02", "B03", "B04", "B08"]


def windows_of(read) -> np.ndarray:
    return np.asarray(read.windows)


@pytest.fixture(scope="module")
def cell_read():
    """All 12 bands of the cell in 64 px patches."""
    return read_tiles(CELL, 64, progress=False)


def to_zone_47(
    stack: np.ndarray, transform, crs, nodata: float | None = None
) -> tuple[np.ndarray, object]:
    """(bands, rows, cols) pixels on ``transform`` in ``crs``, warped to EPSG:32647 at 10 m
    (nearest neighbour, 0 outside): the warped pixels and their transform."""
    bounds = rasterio.transform.array_bounds(*stack.shape[1:], transform)
    dst_transform, width, height = calculate_default_transform(
        crs, "EPSG:32647", stack.shape[2], stack.shape[1], *bounds, resolution=10
    )
    warped = np.zeros((stack.shape[0], height, width), dtype=stack.dtype)
    reproject(
        stack,
        warped,
        src_transform=transform,
        src_crs=crs,
        dst_transform=dst_transform,
        dst_crs="EPSG:32647",
        resampling=Resampling.nearest,
        dst_nodata=nodata,
    )
    return warped, dst_transform


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Two scenes of the same place in two UTM zones: the Major TOM product (its 10 m bands
    and a cloud mask, EPSG:32648) and a multi-band GeoTIFF of it warped to EPSG:32647, whose
    rotated grid leaves nodata wedges along the edges."""
    root = tmp_path_factory.mktemp("archive")
    product = root / "zone48" / PRODUCT.name
    product.mkdir(parents=True)
    for band in TEN_M:
        shutil.copy(PRODUCT / f"{band}.tif", product / f"{band}.tif")
    shutil.copy(PRODUCT / "cloud_mask.tif", product / "cloud_mask.tif")
    arrays = []
    for band in TEN_M:
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            arrays.append(src.read(1))
            profile, transform, crs = src.profile, src.transform, src.crs
    warped, dst_transform = to_zone_47(np.stack(arrays), transform, crs, nodata=0)
    height, width = warped.shape[1:]
    profile.update(
        count=4, width=width, height=height, transform=dst_transform, crs="EPSG:32647", nodata=0
    )
    (root / "zone47").mkdir()
    with rasterio.open(root / "zone47" / "scene_47.tif", "w", **profile) as dst:
        dst.write(warped)
        dst.descriptions = tuple(TEN_M)
    return root


def test_cell_is_cut_on_a_centred_whole_patch_grid(cell_read) -> None:
    read = cell_read
    assert read.patches.shape == (256, 12, 64, 64)
    # 20 m and 60 m bands are resampled in the tiles' own dtype: integers still, kept as such
    assert read.patches.dtype == np.uint16
    assert read.bands == [
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B8A",
        "B09",
        "B11",
        "B12",
    ]
    # 1068 px: 16 whole patches, 44 px left over, 22 on each side; row-major from the NW.
    assert patch_grid(1068, 1068, 64, 64) == (16, 16, 22, 22)
    expect = np.stack(
        np.meshgrid(22 + 64 * np.arange(16), 22 + 64 * np.arange(16), indexing="ij"), -1
    ).reshape(-1, 2)
    np.testing.assert_array_equal(windows_of(read), expect)
    assert read.report == IngestReport(
        scenes=1,
        windows=256,
        kept=256,
        skipped_nodata=0,
        skipped_cloud=0,
        max_nodata=0.5,
        crs_patches={"EPSG:32648": 256},
        seconds=read.report.seconds,
    )


def test_footprints_are_exact_pixel_windows_of_the_source(cell_read) -> None:
    read = cell_read
    fp = read.footprints()
    assert list(fp.columns) == list(COLUMNS)
    assert fp.crs.to_epsg() == 4326
    assert set(fp["source"]) == {str(PRODUCT / "B02.tif")}
    digest = hashlib.sha256((PRODUCT / "B02.tif").read_bytes()).hexdigest()
    assert set(read.checksums) == {digest}
    with rasterio.open(PRODUCT / "B02.tif") as src:
        transform = src.transform
    native = shapely.from_wkt(fp["geometry_native"].to_numpy())
    for i in (0, 17, 255):
        row, col = fp.loc[i, ["row_off", "col_off"]]
        expect = window_bounds(Window(col, row, 64, 64), transform)
        # float64 from the sampler's slices: far below a millimetre (float32 would be ~0.1 m)
        np.testing.assert_allclose(shapely.bounds(native[i]), expect, rtol=0, atol=1e-6)
    # The EPSG:4326 outline lies around the cell's documented lon/lat.
    w, s, e, n = fp.total_bounds
    assert 103.69 < w < e < 103.81 and 17.86 < s < n < 17.98


def test_patch_values_equal_a_rasterio_read_of_the_window(cell_read) -> None:
    read = cell_read
    for band in ("B04", "B05", "B01"):  # 10, 20 and 60 m
        c = read.bands.index(band)
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            scale = 10.0 / src.res[0]
            for i in (0, 100, 255):
                row, col = read.windows[i]
                expect = src.read(
                    1,
                    window=Window(col * scale, row * scale, 64 * scale, 64 * scale),
                    out_shape=(64, 64),
                    resampling=Resampling.bilinear,
                )
                np.testing.assert_array_equal(read.patches[i, c], expect, err_msg=band)


def test_native_bands_keep_their_dtype_and_blocked_reads_change_nothing() -> None:
    blocked = read_tiles(CELL, 128, bands=["B04", "B08"], progress=False)
    single = read_tiles(CELL, 128, bands=["B04", "B08"], read_block=1, progress=False)
    assert blocked.patches.dtype == np.uint16  # no band resampled: exact source values
    assert blocked.patches.shape == (64, 2, 128, 128)
    np.testing.assert_array_equal(blocked.patches, single.patches)
    np.testing.assert_array_equal(blocked.windows, single.windows)


def test_res_resamples_to_a_coarser_grid() -> None:
    read = read_tiles(CELL, 64, bands=["B05", "B02"], res=20, progress=False)
    assert read.resolution == 20.0
    assert read.patches.shape == (64, 2, 64, 64)  # 534 px at 20 m: 8 x 8 patches
    assert read.sources[0].endswith("B05.tif")  # the finest requested band at 20 m
    row, col = read.windows[9]
    with rasterio.open(PRODUCT / "B05.tif") as src:
        np.testing.assert_array_equal(
            read.patches[9, 0], src.read(1, window=Window(col, row, 64, 64))
        )


def test_stride_gives_overlapping_patches() -> None:
    read = read_tiles(CELL, 64, stride=32, bands=["B03"], progress=False)
    rows = (1068 - 64) // 32 + 1
    assert len(read.patches) == rows * rows
    np.testing.assert_array_equal(read.patches[0, :, :, 32:], read.patches[1, :, :, :32])
    np.testing.assert_array_equal(read.patches[0, :, 32:, :], read.patches[rows, :, :32, :])


def test_scenes_in_two_utm_zones_are_kept_apart(archive) -> None:
    scenes = find_scenes(archive)
    assert [s.name for s in scenes] == ["zone47/scene_47.tif", f"zone48/{PRODUCT.name}"]
    assert scenes[1].cloud_mask == archive / "zone48" / PRODUCT.name / "cloud_mask.tif"
    read = read_tiles(archive, 64, bands=TEN_M, max_nodata=1.0, progress=False)
    with rasterio.open(archive / "zone47" / "scene_47.tif") as src:
        height, width = src.shape
        data = src.read()
    rows, cols, _row0, _col0 = patch_grid(height, width, 64, 64)
    assert read.report.crs_patches == {"EPSG:32647": rows * cols, "EPSG:32648": 256}
    fp = read.footprints()
    assert fp["crs"].tolist() == ["EPSG:32647"] * (rows * cols) + ["EPSG:32648"] * 256
    # Each patch is its own file's pixels, never reprojected or mosaicked.
    i = rows * cols // 2
    row, col = read.windows[i]
    np.testing.assert_array_equal(read.patches[i], data[:, row : row + 64, col : col + 64])
    # The same place, seen in both zones: the EPSG:4326 outlines overlap.
    zone47 = shapely.union_all(fp.geometry[: rows * cols].to_numpy())
    zone48 = shapely.union_all(fp.geometry[rows * cols :].to_numpy())
    assert zone47.intersection(zone48).area > 0.9 * zone48.area


def test_nodata_patches_are_skipped_and_counted(archive) -> None:
    scene = archive / "zone47" / "scene_47.tif"
    with rasterio.open(scene) as src:
        data = src.read()
    rows, cols, row0, col0 = patch_grid(data.shape[1], data.shape[2], 64, 64)
    nodata = (data == 0).all(axis=0)
    shares = np.array(
        [
            nodata[row0 + 64 * r : row0 + 64 * (r + 1), col0 + 64 * c : col0 + 64 * (c + 1)].mean()
            for r in range(rows)
            for c in range(cols)
        ]
    )
    threshold = 0.05
    expected = int((shares > threshold).sum())
    assert 0 < expected < rows * cols  # the warped scene has nodata wedges along its edges
    reports: list[IngestReport] = []
    pool = PatchPool.from_tiles(
        scene, 64, max_nodata=threshold, on_report=reports.append, progress=False
    )
    assert reports[0].skipped_nodata == expected and reports[0].skipped_cloud == 0
    assert len(pool) == rows * cols - expected == reports[0].kept
    assert "skipped" in reports[0].summary() and str(expected) in reports[0].summary()
    kept = np.flatnonzero(shares <= threshold)
    np.testing.assert_array_equal(
        pool.footprints[["row_off", "col_off"]].to_numpy(),
        np.stack([row0 + 64 * (kept // cols), col0 + 64 * (kept % cols)], 1),
    )


def test_cloudy_patches_are_skipped_by_the_cloud_mask(tmp_path) -> None:
    product = tmp_path / "cell" / "product"
    product.mkdir(parents=True)
    for band in ("B04", "B03"):
        shutil.copy(PRODUCT / f"{band}.tif", product / f"{band}.tif")
    with rasterio.open(PRODUCT / "cloud_mask.tif") as src:
        profile, mask = src.profile, src.read(1)
    assert not mask.any()  # the real cell is cloud-free: draw a cloud in its north-west
    mask[:300, :250] = 1
    with rasterio.open(product / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    shares = np.array(
        [
            mask[22 + 64 * r : 86 + 64 * r, 22 + 64 * c : 86 + 64 * c].mean()
            for r in range(16)
            for c in range(16)
        ]
    )
    read = read_tiles(tmp_path / "cell", 64, progress=False)
    assert read.report.skipped_cloud == int((shares > 0.5).sum()) > 0
    assert read.report.kept == 256 - read.report.skipped_cloud
    assert read_tiles(tmp_path / "cell", 64, cloud_mask="none", progress=False).report.kept == 256
    strict = read_tiles(tmp_path / "cell", 64, max_nodata=0.0, progress=False)
    assert strict.report.skipped_cloud == int((shares > 0).sum())


def test_a_cloud_mask_in_another_crs_is_warped_by_torchgeo_in_every_build(tmp_path) -> None:
    """A mask off its scene's grid (here in the next UTM zone) is read through TorchGeo's
    WarpedVRT, whose decision is remembered for the process: a second build of the same
    archive warps it again, with the same result; the tiles store refuses it by name."""
    from anneal_geo.data import tiles as tiles_module

    product = tmp_path / "cell" / "product"
    product.mkdir(parents=True)
    for band in ("B04", "B03"):
        shutil.copy(PRODUCT / f"{band}.tif", product / f"{band}.tif")
    with rasterio.open(PRODUCT / "cloud_mask.tif") as src:
        profile, mask, transform, crs = src.profile, src.read(1), src.transform, src.crs
    mask[:300, :250] = 1
    moved, dst_transform = to_zone_47(mask[None], transform, crs)
    height, width = moved.shape[1:]
    profile.update(width=width, height=height, transform=dst_transform, crs="EPSG:32647")
    mask_file = product / "cloud_mask.tif"
    with rasterio.open(mask_file, "w", **profile) as dst:
        dst.write(moved[0], 1)
    tiles_module._NEEDS_WARP.clear()
    first = read_tiles(tmp_path / "cell", 64, progress=False)
    assert first.layout is not None and first.layout.warped == [str(mask_file)]
    assert True in tiles_module._NEEDS_WARP.values()  # remembered
    second = read_tiles(tmp_path / "cell", 64, progress=False)
    assert second.layout is not None and second.layout.warped == [str(mask_file)]
    assert 0 < second.report.skipped_cloud == first.report.skipped_cloud
    np.testing.assert_array_equal(second.patches, first.patches)
    with pytest.raises(DataError, match="cloud_mask.tif is not on its scene's grid"):
        PatchPool.from_tiles(tmp_path / "cell", 64, store="tiles", out=tmp_path / "pool")


def test_safe_layout_takes_each_band_at_its_finest_resolution(tmp_path, cell_read) -> None:
    """A SAFE Level-2A granule: bands in R10m/R20m/R60m, repeated at coarser resolutions,
    beside auxiliary rasters (SCL) that are not bands."""
    img = tmp_path / "S2B_MSIL2A.SAFE" / "GRANULE" / "L2A_T48QUE" / "IMG_DATA"
    prefix = "T48QUE_20200223T032739"
    layout = {
        "R10m": {b: b for b in ("B02", "B03", "B04", "B08")},
        "R20m": {b: b for b in ("B05", "B06", "B07", "B8A", "B11", "B12")}
        | {"B02": "B05", "B04": "B06", "SCL": "cloud_mask"},  # coarser copies, classification
        "R60m": {"B01": "B01", "B09": "B09", "B02": "B01"},
    }
    for folder, files in layout.items():
        (img / folder).mkdir(parents=True)
        res = folder[1:]
        for band, source in files.items():
            shutil.copy(PRODUCT / f"{source}.tif", img / folder / f"{prefix}_{band}_{res}.tif")
    scenes = find_scenes(tmp_path)
    assert len(scenes) == 1 and scenes[0].cloud_mask is None
    assert scenes[0].band_files["B02"] == img / "R10m" / f"{prefix}_B02_10m.tif"
    read = read_tiles(tmp_path, 64, progress=False)
    assert read.bands == cell_read.bands
    np.testing.assert_array_equal(read.patches, cell_read.patches)
    assert read.sources[0] == str(img / "R10m" / f"{prefix}_B02_10m.tif")


def test_eurosat_files_read_as_tiles_equal_the_folder_reader(tmp_path) -> None:
    files = sorted((SAMPLE / "eurosat_ms").glob("*/*.tif"))[::25]
    for f in files:
        (tmp_path / f.parent.name).mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / f.parent.name / f.name)
    tiles = PatchPool.from_tiles(tmp_path, 64, progress=False)
    folder = PatchPool.from_folder(tmp_path)
    np.testing.assert_array_equal(tiles.patches, folder.patches)
    assert tiles.bands == folder.bands and tiles.sources == folder.sources
    a, b = tiles.footprints, folder.footprints
    assert a["crs"].nunique() > 3 and (a["crs"] == b["crs"]).all()
    np.testing.assert_allclose(
        shapely.get_coordinates(shapely.from_wkt(a["geometry_native"].to_numpy())),
        shapely.get_coordinates(shapely.from_wkt(b["geometry_native"].to_numpy())),
        rtol=0,
        atol=1e-6,
    )


def test_pool_from_tiles_saves_and_reopens(tmp_path) -> None:
    pool = PatchPool.from_tiles(CELL, 128, bands=TEN_M, progress=False)
    pool.save(tmp_path / "pool")
    opened = PatchPool.open(tmp_path / "pool")
    np.testing.assert_array_equal(np.asarray(opened.patches), pool.patches)
    assert opened.fingerprint == pool.fingerprint and opened.resolution == 10.0
    assert opened.footprints["row_off"].tolist() == pool.footprints["row_off"].tolist()
    assert "EPSG:32648 (64)" in opened.describe()


def test_load_detects_tile_archives_but_not_patch_folders() -> None:
    assert is_tile_archive(CELL)
    assert not is_tile_archive(SAMPLE / "eurosat_ms")
    assert not is_tile_archive(SAMPLE / "eurosat_rgb")
    pool = PatchPool.load(CELL, bands=["B04", "B03", "B02"])
    assert len(pool) == 256 and pool.bands == ["B04", "B03", "B02"] and pool.labels is None


# ---------------------------------------------------------------------------- bad input


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_folder_without_rasters_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "README.md").write_text("no tiles here")
    shutil.copy(next((SAMPLE / "eurosat_rgb").glob("*/*.jpg")), tmp_path / "photo.jpg")
    with pytest.raises(DataError) as exc:
        read_tiles(tmp_path, 64)
    assert "holds no rasters matching" in one_line(exc)


def test_a_patch_larger_than_the_tile_is_a_clear_error() -> None:
    with pytest.raises(DataError) as exc:
        read_tiles(CELL, 2000, bands=["B02"])
    assert "patch size 2000 px is larger than scene" in one_line(exc)
    assert "1068x1068" in one_line(exc)


def test_bands_a_file_lacks_are_a_clear_error(archive) -> None:
    with pytest.raises(DataError) as exc:
        read_tiles(CELL, 64, bands=["B04", "B10"])
    assert "band 'B10' is not in scene" in one_line(exc)
    with pytest.raises(DataError) as exc:  # the multi-band scene has only four bands
        read_tiles(archive, 64, bands=["B04", "B05"])
    assert "band 'B05' is not in scene zone47/scene_47.tif" in one_line(exc)


def test_rasters_without_crs_are_a_clear_error(tmp_path) -> None:
    with rasterio.open(PRODUCT / "B02.tif") as src:
        data, profile = src.read(), src.profile
    profile.update(crs=None)
    with rasterio.open(tmp_path / "B02.tif", "w", **profile) as dst:
        dst.write(data)
    shutil.copy(tmp_path / "B02.tif", tmp_path / "B03.tif")
    with pytest.raises(DataError) as exc:
        read_tiles(tmp_path, 64)
    assert "has no CRS" in one_line(exc)


def test_bad_settings_are_config_errors() -> None:
    for options in ({"max_nodata": 1.5}, {"stride": 0}, {"res": -10.0}, {"read_block": 0}):
        with pytest.raises(ConfigError):
            read_tiles(CELL, 64, **options)
    with pytest.raises(ConfigError):
        read_tiles(CELL, 0)
