"""xarray in and out: cubes cut into pools, pools as DataArrays, exact round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import xarray as xr

from anneal_geo.data import pool_from_xarray, pool_to_xarray
from anneal_geo.data.pool import PatchPool
from anneal_geo.data.tiles import IngestReport
from anneal_geo.errors import DataError

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
CELL = SAMPLE / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def cube() -> xr.DataArray:
    """The cell's 10 m bands as a rioxarray-style (band, y, x) cube with pixel centres."""
    arrays = []
    for band in BANDS:
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            arrays.append(src.read(1))
            transform, crs = src.transform, src.crs
    height, width = arrays[0].shape
    return xr.DataArray(
        np.stack(arrays),
        dims=("band", "y", "x"),
        coords={
            "band": BANDS,
            "x": transform.c + (np.arange(width) + 0.5) * transform.a,
            "y": transform.f + (np.arange(height) + 0.5) * transform.e,
            "spatial_ref": ((), 0, {"crs_wkt": crs.to_wkt()}),
        },
        name="majortom",
    )


@pytest.fixture(scope="module")
def tile_pool() -> PatchPool:
    return PatchPool.from_tiles(CELL, 64, bands=BANDS, progress=False)


def native_coords(pool: PatchPool) -> np.ndarray:
    return shapely.get_coordinates(shapely.from_wkt(pool.footprints["geometry_native"].to_numpy()))


def test_a_cube_is_cut_like_the_tiles_it_came_from(cube, tile_pool) -> None:
    reports: list[IngestReport] = []
    pool = pool_from_xarray(cube, 64, on_report=reports.append)
    assert pool.bands == BANDS and pool.patches.dtype == np.uint16
    np.testing.assert_array_equal(pool.patches, tile_pool.patches)
    assert pool.source_crs == ["EPSG:32648"] * 256 and set(pool.sources) == {"majortom"}
    cols = ["row_off", "col_off", "height", "width", "crs"]
    assert pool.footprints[cols].equals(tile_pool.footprints[cols])
    np.testing.assert_allclose(native_coords(pool), native_coords(tile_pool), rtol=0, atol=1e-6)
    assert reports[0].kept == 256 and reports[0].skipped == 0


def test_a_time_series_cube_gives_patches_per_time_step(cube) -> None:
    times = np.array(["2020-02-23", "2020-03-04"], dtype="datetime64[ns]")
    series = xr.concat([cube, cube // 2], dim=xr.DataArray(times, dims="time", name="time"))
    assert series.dims == ("time", "band", "y", "x")
    pool = pool_from_xarray(series, 128, stride=256)
    per_step = 4 * 4  # (1068 - 128) // 256 + 1 = 4 rows and columns
    assert len(pool) == 2 * per_step
    np.testing.assert_array_equal(pool.patches[per_step:], pool.patches[:per_step] // 2)
    assert pool.sources[0] == "majortom[time=2020-02-23T00:00:00]"
    assert pool.sources[-1] == "majortom[time=2020-03-04T00:00:00]"
    # Both time steps cover the same windows.
    fp = pool.footprints
    assert fp["geometry_native"][:per_step].tolist() == fp["geometry_native"][per_step:].tolist()


def test_crs_attribute_geotransform_and_south_up_cubes(cube) -> None:
    north_up = pool_from_xarray(cube, 256)
    gt = cube.x.values[0] - 5, 10.0, 0.0, cube.y.values[0] + 5, 0.0, -10.0
    plain = cube.drop_vars(["spatial_ref", "x", "y"]).assign_coords(
        spatial_ref=((), 0, {"GeoTransform": " ".join(map(str, gt))})
    )
    plain.attrs["crs"] = "EPSG:32648"
    np.testing.assert_array_equal(pool_from_xarray(plain, 256).patches, north_up.patches)
    south_up = cube.isel(y=slice(None, None, -1))  # y increasing: stored bottom row first
    flipped = pool_from_xarray(south_up, 256)
    np.testing.assert_array_equal(flipped.patches, north_up.patches)
    np.testing.assert_allclose(native_coords(flipped), native_coords(north_up), atol=1e-6)


def test_nodata_pixels_skip_patches(cube) -> None:
    values = cube.astype(np.float32)
    values[:, :300, :300] = np.nan
    reports: list[IngestReport] = []
    pool = pool_from_xarray(values, 64, on_report=reports.append)
    grid = np.zeros((1068, 1068), dtype=bool)
    grid[:300, :300] = True
    shares = np.array(
        [
            grid[22 + 64 * r : 86 + 64 * r, 22 + 64 * c : 86 + 64 * c].mean()
            for r in range(16)
            for c in range(16)
        ]
    )
    assert reports[0].skipped_nodata == int((shares > 0.5).sum()) > 0
    assert len(pool) == 256 - reports[0].skipped_nodata


def test_pool_to_xarray_carries_band_names_and_footprint_coordinates(cube, tile_pool) -> None:
    da = pool_to_xarray(tile_pool)
    assert da.dims == ("patch", "band", "y", "x") and da.shape == (256, 4, 64, 64)
    assert da["band"].values.tolist() == BANDS
    assert da["patch"].values.tolist() == list(range(256))
    i = 37
    row, col = int(da["row_off"][i]), int(da["col_off"][i])
    np.testing.assert_allclose(da["x_native"][i].values, cube.x.values[col : col + 64])
    np.testing.assert_allclose(da["y_native"][i].values, cube.y.values[row : row + 64])
    np.testing.assert_array_equal(
        da.isel(patch=i).values, cube.isel(y=slice(row, row + 64), x=slice(col, col + 64)).values
    )
    assert str(da["crs"][i].values) == "EPSG:32648"
    assert 103.69 < float(da["lon"][i]) < 103.81 and 17.86 < float(da["lat"][i]) < 17.98
    assert da.attrs["fingerprint"] == tile_pool.fingerprint


def test_pool_round_trips_through_xarray(tile_pool) -> None:
    back = pool_from_xarray(pool_to_xarray(tile_pool))
    np.testing.assert_array_equal(back.patches, tile_pool.patches)
    assert back.bands == tile_pool.bands and back.sources == tile_pool.sources
    assert back.fingerprint == tile_pool.fingerprint and back.resolution == 10.0
    np.testing.assert_allclose(back.band_mean, tile_pool.band_mean)
    cols = ["patch_id", "source", "crs", "row_off", "col_off", "height", "width"]
    assert back.footprints[cols].equals(tile_pool.footprints[cols])
    np.testing.assert_allclose(native_coords(back), native_coords(tile_pool), atol=1e-6)


def test_a_labelled_pool_round_trips_with_its_labels(tmp_path) -> None:
    for f in sorted((SAMPLE / "eurosat_ms").glob("*/*.tif"))[::30]:
        (tmp_path / f.parent.name).mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / f.parent.name / f.name)
    pool = PatchPool.from_folder(tmp_path)
    da = pool_to_xarray(pool)
    assert da["label"].values.tolist() == [pool.label_text(i) for i in range(len(pool))]
    back = pool_from_xarray(da)
    np.testing.assert_array_equal(back.labels, pool.labels)
    assert back.class_names == pool.class_names and back.fingerprint == pool.fingerprint
    assert back.footprints["label"].tolist() == pool.footprints["label"].tolist()
    assert back.footprints["crs"].tolist() == pool.footprints["crs"].tolist()


def test_bad_cubes_are_clear_errors(cube) -> None:
    cases = [
        (cube.drop_vars("spatial_ref"), "has no CRS"),
        (cube.rename(band="channel"), "expected (band, y, x)"),
        (cube.expand_dims(level=[0]), "expected (band, y, x)"),
        (cube.isel(x=slice(0, 40)), "larger than the cube"),
        (cube.assign_coords(x=np.sort(np.random.default_rng(0).random(1068))), "regularly"),
        (cube.to_dataset(name="reflectance"), "takes an xarray.DataArray"),
    ]
    for data, message in cases:
        with pytest.raises(DataError) as exc:
            pool_from_xarray(data, 64)
        assert message in str(exc.value) and "\n" not in str(exc.value)
