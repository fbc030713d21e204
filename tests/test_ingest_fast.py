"""Direct windowed reads of tile archives on the real Major TOM cell: the same patches as a
plain per-patch rasterio read and as TorchGeo's own ``__getitem__`` path (``read_block``),
in strips or whole, in one thread or several, through the CLI's ``--workers``."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.windows import Window

from anneal_geo.data import tiles
from anneal_geo.data.footprints import build_footprints
from anneal_geo.data.pool import PatchPool, band_statistics
from anneal_geo.data.tiles import find_scenes, read_tiles
from anneal_geo.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
TEN_M = ["B02", "B03", "B04", "B08"]
EXE = Path(sys.executable).parent / "anneal-geo"


def per_patch_reference(read, ids: np.ndarray) -> np.ndarray:
    """Patches ``ids`` of a read of the cell, band by band, with a plain rasterio windowed
    read (bilinear onto the 10 m grid, as TorchGeo resamples)."""
    size = read.patches.shape[-1]
    expect = np.empty((len(ids), *read.patches.shape[1:]), dtype=read.patches.dtype)
    for c, band in enumerate(read.bands):
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            scale = 10.0 / src.res[0]
            for i, (row, col) in enumerate(read.windows[ids]):
                expect[i, c] = src.read(
                    1,
                    window=Window(col * scale, row * scale, size * scale, size * scale),
                    out_shape=(size, size),
                    resampling=Resampling.bilinear,
                )
    return expect


def test_twelve_bands_at_10_20_60_m_equal_per_patch_reads() -> None:
    read = read_tiles(CELL, 64, cloud_mask=None, progress=False)
    assert read.patches.shape == (256, 12, 64, 64) and read.patches.dtype == np.uint16
    ids = np.r_[0:17, 17:256:7, 255]  # the first row and column, the last patch, a spread
    np.testing.assert_array_equal(read.patches[ids], per_patch_reference(read, ids))


def test_ten_metre_bands_with_overlap_equal_per_patch_reads() -> None:
    read = read_tiles(CELL, 120, stride=100, bands=TEN_M, cloud_mask=None, progress=False)
    assert read.patches.dtype == np.uint16 and len(read.patches) == 100
    ids = np.arange(100)
    np.testing.assert_array_equal(read.patches, per_patch_reference(read, ids))


@pytest.mark.parametrize(
    "options",
    [
        {"patch_size": 120, "bands": ["B01", "B05", "B04"]},  # 60, 20 and 10 m
        {"patch_size": 256, "stride": 200, "bands": TEN_M},
    ],
)
def test_direct_reads_equal_torchgeos_getitem_path(options) -> None:
    direct = read_tiles(CELL, progress=False, **options)
    torchgeo = read_tiles(CELL, progress=False, read_block=2, **options)
    assert direct.patches.dtype == torchgeo.patches.dtype
    np.testing.assert_array_equal(direct.patches, torchgeo.patches)
    np.testing.assert_array_equal(direct.windows, torchgeo.windows)
    assert direct.georefs == torchgeo.georefs and direct.sources == torchgeo.sources


def test_nodata_and_cloud_skipping_equal_torchgeos_getitem_path(masked_scenes) -> None:
    for options in ({"stride": None}, {"stride": 48}):
        direct = read_tiles(masked_scenes, 64, max_nodata=0.2, progress=False, **options)
        torchgeo = read_tiles(
            masked_scenes, 64, max_nodata=0.2, read_block=4, progress=False, **options
        )
        assert direct.report.skipped_cloud > 0 and direct.report.skipped_nodata > 0
        for name in ("kept", "skipped_nodata", "skipped_cloud", "windows"):
            assert getattr(direct.report, name) == getattr(torchgeo.report, name), name
        np.testing.assert_array_equal(direct.patches, torchgeo.patches)
        np.testing.assert_array_equal(direct.windows, torchgeo.windows)
        assert direct.sources == torchgeo.sources
        # Footprints built for every window while reading, then those of the kept ones.
        fast, slow = direct.footprints(), torchgeo.footprints()
        assert fast.drop(columns="geometry").equals(slow.drop(columns="geometry"))
        assert fast.index.equals(slow.index)
        assert shapely.to_wkb(fast.geometry.to_numpy()).tolist() == (
            shapely.to_wkb(slow.geometry.to_numpy()).tolist()
        )


def test_strips_threads_and_whole_scene_reads_give_the_same_pool(monkeypatch) -> None:
    options = {"patch_size": 64, "stride": 48, "bands": ["B8A", "B02"], "cloud_mask": "auto"}
    whole = read_tiles(CELL, progress=False, num_workers=1, **options)
    monkeypatch.setattr(tiles, "_STRIP_PIXELS", 150 * 1024)  # strips of 2 patch rows
    strips = read_tiles(CELL, progress=False, num_workers=2, **options)
    np.testing.assert_array_equal(whole.patches, strips.patches)
    np.testing.assert_array_equal(whole.windows, strips.windows)
    assert whole.report.kept == strips.report.kept == len(whole.patches)


def test_workers_give_the_same_pool_over_two_scenes(tmp_path) -> None:
    """Two copies of the cell as two scenes (two products), one thread or two; and
    ``anneal-geo pool build --workers 2`` saves the same patches."""
    for name in ("first", "second"):
        product = tmp_path / "archive" / name / PRODUCT.name
        product.mkdir(parents=True)
        for path in PRODUCT.glob("*.tif"):
            os.symlink(path, product / path.name)
    archive = tmp_path / "archive"
    assert len(find_scenes(archive)) == 2
    one = read_tiles(archive, 64, bands=["B05", "B04"], num_workers=1, progress=False)
    two = read_tiles(archive, 64, bands=["B05", "B04"], num_workers=2, progress=False)
    assert one.patches.shape == (512, 2, 64, 64)
    np.testing.assert_array_equal(one.patches, two.patches)
    np.testing.assert_array_equal(one.patches[:256], one.patches[256:])  # the same cell twice
    assert one.sources == two.sources and one.georefs == two.georefs
    np.testing.assert_array_equal(one.band_mean, two.band_mean)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "pool"
    args = ["pool", "build", str(archive), "--out", str(out), "--bands", "B05,B04"]
    result = subprocess.run(
        [str(EXE), *args, "--patch-size", "64", "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    saved = PatchPool.open(out)
    np.testing.assert_array_equal(saved.patches, one.patches)
    np.testing.assert_array_equal(saved.footprints[["row_off", "col_off"]], one.windows)


def _forked_build(queue) -> None:
    read = read_tiles(CELL, 120, bands=TEN_M, cloud_mask=None, progress=False, num_workers=2)
    queue.put((read.patches.sum(dtype=np.int64).item(), read.checksums[0]))


def test_reader_threads_are_kept_across_builds_and_a_forked_child_reads_alone() -> None:
    """The reader threads outlive a build (no per-build GDAL and PROJ set-up); the next
    build and a child forked while those threads are alive read the same pool."""
    import multiprocessing
    import threading
    import warnings

    first = read_tiles(CELL, 120, bands=TEN_M, cloud_mask=None, progress=False, num_workers=2)
    readers = {t.ident for t in threading.enumerate() if t.name.startswith("read-tiles")}
    assert len(readers) == 2
    again = read_tiles(CELL, 120, bands=TEN_M, cloud_mask=None, progress=False, num_workers=2)
    assert readers <= {t.ident for t in threading.enumerate() if t.name.startswith("read-tiles")}
    np.testing.assert_array_equal(first.patches, again.patches)
    assert first.checksums == again.checksums and len(first.checksums[0]) == 64
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_build, args=(queue,))
    with warnings.catch_warnings():  # "this process is multi-threaded": that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, "the forked child did not finish its read"
    assert queue.get(timeout=5) == (first.patches.sum(dtype=np.int64).item(), first.checksums[0])


def test_footprints_equal_build_footprints_to_the_bit() -> None:
    read = read_tiles(CELL, 64, stride=200, bands=["B02"], progress=False)
    fast = read.footprints()
    slow = build_footprints(read.georefs, read.sources, [None] * len(read.sources))
    slow["row_off"] = read.windows[:, 0]
    slow["col_off"] = read.windows[:, 1]
    assert list(fast.columns) == list(slow.columns) and fast.crs == slow.crs
    for column in fast.columns.drop("geometry"):
        assert fast[column].tolist() == slow[column].tolist(), column
    assert shapely.to_wkb(fast.geometry.to_numpy()).tolist() == (
        shapely.to_wkb(slow.geometry.to_numpy()).tolist()
    )


def test_statistics_are_the_exact_moments_of_the_patches() -> None:
    pool = PatchPool.from_tiles(CELL, 120, bands=["B05", "B02"], progress=False)
    mean, std = band_statistics(pool.patches)
    np.testing.assert_allclose(pool.band_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(pool.band_std, std, rtol=1e-14)
    values = pool.patches[:, 0].astype(np.int64).ravel()
    n, total, squares = values.size, int(values.sum()), int((values * values).sum())
    assert pool.band_mean[0] == float(Fraction(total, n))
    assert pool.band_std[0] ** 2 == pytest.approx(float(Fraction(n * squares - total**2, n * n)))


@pytest.mark.parametrize(
    "options",
    [
        {"patch_size": 120, "bands": TEN_M, "cloud_mask": None},
        {"patch_size": 64, "cloud_mask": "auto"},  # 12 bands, 10-60 m, with the cloud mask
        {"patch_size": 64, "stride": 16, "bands": ["B05", "B02"], "cloud_mask": None},
    ],
)
def test_first_strips_read_while_torchgeo_indexes_are_the_reads_due(options, monkeypatch) -> None:
    """With reader threads, each band's first strip is read while TorchGeo indexes the
    scene, from the file headers alone; every such read is the read the strip needs (the
    same file, bounds, resolution and resampling): no band is read twice, and the pool is
    the one read in one thread, which reads nothing early."""
    calls: list[str] = []
    merge_read = tiles._merge_read

    def counted(src, *args, **kwargs):
        calls.append(src.name)
        return merge_read(src, *args, **kwargs)

    monkeypatch.setattr(tiles, "_merge_read", counted)
    threads = read_tiles(CELL, progress=False, num_workers=2, **options)
    early = len(calls)
    calls.clear()
    one = read_tiles(CELL, progress=False, num_workers=1, **options)
    bands = len(threads.bands) + (options["cloud_mask"] == "auto")
    assert early == len(calls) == bands  # one read per file either way
    np.testing.assert_array_equal(threads.patches, one.patches)
    np.testing.assert_array_equal(threads.band_mean, one.band_mean)
    np.testing.assert_array_equal(threads.band_std, one.band_std)
    assert threads.report.kept == one.report.kept and threads.checksums == one.checksums


def test_an_unreadable_band_is_reported_after_its_early_read_failed(tmp_path) -> None:
    """A band file whose header opens but whose pixels are cut off: its early read fails
    quietly, the read proper names the file; the next build reads again."""
    product = tmp_path / "cell" / "product"
    product.mkdir(parents=True)
    for band in TEN_M:
        data = (PRODUCT / f"{band}.tif").read_bytes()
        if band == "B03":
            data = data[: len(data) // 3]
        (product / f"{band}.tif").write_bytes(data)
    for _ in range(2):
        with pytest.raises(DataError) as exc:
            read_tiles(tmp_path / "cell", 120, progress=False, num_workers=2)
        message = str(exc.value)
        assert "\n" not in message and "B03.tif of scene product could not be read" in message
        assert "re-download" in message


def test_a_small_pool_saves_the_footprints_written_beside_its_reads(tmp_path) -> None:
    """A small array-store build writes footprints.gpkg while its pixels are read; save()
    copies that file, equal to writing the footprints then. Once the footprints are handed
    out (they may be changed) or patches were skipped, save() writes them itself; the
    temporary file goes with the pool."""
    import gc
    import pickle

    from anneal_geo.data.footprints import read_footprints, write_footprints

    pool = PatchPool.from_tiles(CELL, 120, bands=TEN_M, progress=False, num_workers=2)
    prepared = pool._prepared_footprints.path
    assert prepared is not None and prepared.is_file()
    # A pickled copy holds no file of its own, and going does not take the pool's.
    copied = pickle.loads(pickle.dumps(pool))
    assert copied._prepared_footprints is None
    copied.save(tmp_path / "copy")
    del copied
    gc.collect()
    assert prepared.is_file()
    pool.save(tmp_path / "a")
    assert read_footprints(tmp_path / "copy" / "footprints.gpkg").equals(
        read_footprints(tmp_path / "a" / "footprints.gpkg")
    )
    written = read_footprints(tmp_path / "a" / "footprints.gpkg")
    write_footprints(pool.footprints, tmp_path / "direct.gpkg")  # hands them out
    assert not prepared.exists() and pool._prepared_footprints is None
    assert written.equals(read_footprints(tmp_path / "direct.gpkg"))
    assert len(written) == len(pool) == 64
    # Changed after being handed out: the change is saved.
    pool.footprints.loc[3, "label"] = "changed"
    pool.save(tmp_path / "b")
    assert read_footprints(tmp_path / "b" / "footprints.gpkg")["label"][3] == "changed"
    # The temporary file goes when the pool goes.
    other = PatchPool.from_tiles(CELL, 120, bands=TEN_M, progress=False, num_workers=2)
    path = other._prepared_footprints.path
    assert path.is_file()
    del other
    gc.collect()
    assert not path.parent.exists()
    # Patches skipped (a cloud mask): the footprints of the kept ones, written by save().
    cloudy = tmp_path / "cloudy" / "product"
    cloudy.mkdir(parents=True)
    for band in TEN_M:
        os.symlink(PRODUCT / f"{band}.tif", cloudy / f"{band}.tif")
    with rasterio.open(PRODUCT / "cloud_mask.tif") as src:
        profile, mask = src.profile, src.read(1)
    mask[:400, :400] = 1
    with rasterio.open(cloudy / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    skipped = PatchPool.from_tiles(tmp_path / "cloudy", 120, bands=TEN_M, progress=False)
    assert len(skipped) < 64 and skipped._prepared_footprints is None
    skipped.save(tmp_path / "c")
    saved = read_footprints(tmp_path / "c" / "footprints.gpkg")
    assert saved["patch_id"].tolist() == list(range(len(skipped)))
    assert saved["row_off"].tolist() == skipped.footprints["row_off"].tolist()


def test_bad_worker_counts_are_config_errors() -> None:
    for workers in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="num_workers"):
            read_tiles(CELL, 64, bands=["B02"], num_workers=workers)


@pytest.mark.parametrize("size, stride", [(64, 16), (64, 64), (50, 37), (32, 48), (7, 3)])
def test_window_sums_are_exact(size, stride) -> None:
    rows, cols = 5, 6
    height, width = (rows - 1) * stride + size, (cols - 1) * stride + size
    image = np.random.default_rng(size).integers(0, 65536, (height, width)).astype(np.uint16)
    for pixels in (image, image > 30000, image.astype(np.uint32) ** 2):
        expect = [
            int(pixels[r * stride : r * stride + size, c * stride : c * stride + size].sum())
            for r in range(rows)
            for c in range(cols)
        ]
        got = tiles._window_sums(pixels, rows, cols, size, stride, np.uint64)
        assert got.tolist() == expect
