"""The tiles store: a pool that keeps only its patches' windows and reads their pixels from
the tiles, on the real Major TOM cell (same patches, statistics, footprints and dates as the
array store; moved and changed tiles; disk used; an engine session on it)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.annotators.render import PatchRenderer
from anneal_geo.cli import app
from anneal_geo.data.pool import PATCHES_FILE, POOL_FILE, PatchPool
from anneal_geo.data.windows import WINDOWS_FILE, TileWindows
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError, SessionError
from anneal_geo.models import export_model, read_card
from anneal_geo.retrieval.geoindex import GeoIndex
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
TEN_M = ["B02", "B03", "B04", "B08"]

# (patch size, bands): 12 bands at 32 px (10, 20 and 60 m bands resampled onto the 10 m
# grid: float32), the four 10 m bands at 64 px (uint16, no resampling).
CASES = {"12 bands 32 px": (32, None), "4 bands 64 px": (64, TEN_M)}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module", params=list(CASES))
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(array pool, tiles pool reopened from its folder, the tiles pool as built)."""
    size, bands = CASES[request.param]
    array = PatchPool.from_tiles(CELL, size, bands=bands, progress=False)
    out = tmp_path_factory.mktemp("tiles") / "pool"
    built = PatchPool.from_tiles(CELL, size, bands=bands, progress=False, store="tiles", out=out)
    return array, PatchPool.open(out), built


def test_whole_pool_equals_the_array_store(stores) -> None:
    array, tiles, built = stores
    assert isinstance(tiles.patches, TileWindows) and tiles.store == "tiles"
    assert array.store == "array"
    assert tiles.patches.shape == array.patches.shape
    assert tiles.patches.dtype == array.patches.dtype
    assert np.array_equal(np.asarray(tiles.patches), array.patches)  # grid rows, whole
    assert np.array_equal(np.asarray(built.patches), array.patches)
    # One patch at a time (one small window per band, resampled at its own edges): every
    # fifth column at a time, so no grid row is dense enough to be read in one window.
    cols = tiles.patches._grid_col
    for k in range(5):
        ids = np.flatnonzero(cols % 5 == k)
        assert np.array_equal(tiles.patches[ids], array.patches[ids]), f"columns {k} mod 5"


def test_indexing_like_an_array(stores) -> None:
    array, tiles, _ = stores
    lazy, ref = tiles.patches, array.patches
    n = len(ref)
    assert len(lazy) == n and lazy.ndim == 4 and lazy.shape == ref.shape
    rng = np.random.default_rng(3)
    ids = rng.integers(0, n, 300)
    ids[:5] = ids[5]  # repeats
    assert np.array_equal(lazy[ids], ref[ids])
    assert np.array_equal(lazy[ids[::-1].tolist()], ref[ids[::-1]])
    for key in (slice(None, 40), slice(7, n, 13), slice(None, None, -50), slice(n - 3, None)):
        assert np.array_equal(lazy[key], ref[key]), key
    assert np.array_equal(lazy[5], ref[5]) and np.array_equal(lazy[-1], ref[-1])
    assert np.array_equal(lazy[ids, 1:3], ref[ids, 1:3])
    assert np.array_equal(lazy[2:9, [1, 0], ::2, 3], ref[2:9, [1, 0], ::2, 3])
    assert np.array_equal(lazy[4, 0], ref[4, 0])
    assert np.array_equal(lazy[[3, 1, 3], [0, 1, 1], 5], ref[[3, 1, 3], [0, 1, 1], 5])
    assert np.array_equal(lazy[ids[:2], :, [2, 4]], ref[ids[:2], :, [2, 4]])
    assert np.array_equal(lazy[..., 3], ref[..., 3])
    mask = np.zeros(n, dtype=bool)
    mask[[0, 17, n - 1]] = True
    assert np.array_equal(lazy[mask], ref[mask])
    assert lazy[np.array([], dtype=np.int64)].shape == (0, *ref.shape[1:])
    assert np.array_equal(np.asarray(lazy, dtype=np.float64), ref.astype(np.float64))
    with pytest.raises(IndexError):
        lazy[n]
    with pytest.raises(IndexError):
        lazy[np.array([0, n])]
    assert np.array_equal(tiles.float_patches(ids), array.float_patches(ids))
    assert np.array_equal(tiles.rgb(11), array.rgb(11))
    picked = tiles.select_bands(["B04", "B02"])
    assert isinstance(picked.patches, TileWindows)
    assert np.array_equal(picked.patches[ids], array.select_bands(["B04", "B02"]).patches[ids])


def test_two_threads_read_the_same_values(stores) -> None:
    array, tiles, _ = stores
    got: dict[int, np.ndarray] = {}
    ids = [np.arange(k, len(array), 3) for k in range(2)]

    def read(k: int) -> None:
        got[k] = np.concatenate([tiles.patches[ids[k][i : i + 7]] for i in range(0, 70, 7)])

    threads = [threading.Thread(target=read, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(2):
        assert np.array_equal(got[k], array.patches[ids[k][:70]])


def test_closed_files_reopen_on_the_next_read(stores) -> None:
    array, tiles, _ = stores
    ids = np.arange(0, len(array), 5)
    assert np.array_equal(tiles.patches[ids], array.patches[ids])
    assert tiles.patches._handles._open  # the band files stay open between reads
    tiles.close_files()
    assert not tiles.patches._handles._open
    assert np.array_equal(tiles.patches[ids[::-1]], array.patches[ids[::-1]])
    array.close_files()  # an array pool has nothing to close
    assert np.array_equal(array.patches[ids], tiles.patches[ids])


def test_statistics_footprints_sources_and_dates_equal(stores) -> None:
    array, tiles, built = stores
    for pool in (tiles, built):
        assert np.array_equal(pool.band_mean, array.band_mean)
        assert np.array_equal(pool.band_std, array.band_std)
        assert pool.sources == array.sources and pool.acquired == array.acquired
        assert pool.source_crs == array.source_crs
        assert pool.source_sha256 == array.source_sha256
        assert pool.bands == array.bands and pool.resolution == array.resolution
        assert pool.fingerprint == array.fingerprint
    # One string per scene, shared by its patches.
    assert len({id(s) for s in tiles.sources}) == 1
    fa, ft = array.footprints, tiles.footprints
    assert list(fa.columns) == list(ft.columns)
    for column in ("patch_id", "source", "crs", "row_off", "col_off", "geometry_native"):
        assert fa[column].tolist() == ft[column].tolist(), column
    assert fa.geometry.to_wkt().tolist() == ft.geometry.to_wkt().tolist()
    # The windows are those of the footprints, kept as int arrays, not JSON per patch.
    assert np.array_equal(tiles.patches.row, fa["row_off"].to_numpy())
    assert np.array_equal(tiles.patches.col, fa["col_off"].to_numpy())
    meta = json.loads((tiles.path / POOL_FILE).read_text())
    assert meta["store"] == "tiles" and "sources" not in meta and "sha256" not in meta
    assert len(meta["scenes"]) == 1 and meta["stride"] == tiles.patch_size[0]
    scene = meta["scenes"][0]
    assert scene["sha256"] == array.source_sha256[0]
    assert [Path(f["path"]).name for f in scene["files"]] == [f"{b}.tif" for b in array.bands]
    first = scene["files"][0]
    assert not os.path.isabs(first["relative"])
    assert os.path.getsize(first["path"]) == first["size"]
    with np.load(tiles.path / WINDOWS_FILE) as windows:
        assert {windows[k].dtype for k in ("scene", "row", "col")} == {np.dtype(np.int32)}
    assert not (tiles.path / PATCHES_FILE).exists()


def test_checksums_are_checked_once_per_scene(stores) -> None:
    _, tiles, _ = stores
    assert tiles.check_sources() == []


def test_cloud_and_nodata_skipped_as_in_the_array_store(masked_scenes, tmp_path) -> None:
    options: dict[str, Any] = {"bands": ["B08", "B04"], "max_nodata": 0.2, "progress": False}
    reports: list[Any] = []
    array = PatchPool.from_tiles(masked_scenes, 48, on_report=reports.append, **options)
    tiles = PatchPool.from_tiles(
        masked_scenes, 48, on_report=reports.append, store="tiles", out=tmp_path, **options
    )
    assert reports[0].skipped_cloud > 0 and reports[0].skipped_nodata > 0
    assert reports[0].kept == reports[1].kept and reports[0].skipped == reports[1].skipped
    opened = PatchPool.open(tmp_path)
    assert len(opened) == len(array) < reports[0].windows
    assert np.array_equal(np.asarray(opened.patches), array.patches)
    ids = np.random.default_rng(0).permutation(len(array))[:64]
    assert np.array_equal(opened.patches[ids], array.patches[ids])
    assert np.array_equal(opened.band_mean, array.band_mean)
    assert np.array_equal(opened.band_std, array.band_std)
    assert opened.sources == array.sources == tiles.sources
    assert opened.fingerprint == array.fingerprint
    assert len(json.loads((tmp_path / POOL_FILE).read_text())["scenes"]) == 2


def test_moved_or_changed_tiles(tmp_path) -> None:
    archive = tmp_path / "a" / "tiles" / "product"
    archive.mkdir(parents=True)
    for band in TEN_M:
        shutil.copy2(PRODUCT / f"{band}.tif", archive / f"{band}.tif")
    pool_dir = tmp_path / "a" / "pool"
    built = PatchPool.from_tiles(
        archive.parent, 64, bands=TEN_M, progress=False, store="tiles", out=pool_dir
    )
    expected = np.asarray(built.patches)
    # The pool and its archive moved together: found through the relative paths.
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = PatchPool.open(tmp_path / "b" / "pool")
    assert np.array_equal(np.asarray(moved.patches), expected)
    assert moved.fingerprint == built.fingerprint
    assert str(tmp_path / "b") in moved.sources[0]
    assert moved.check_sources() == []
    # Saved elsewhere: the same windows, the relative paths from the new folder.
    copy = moved.save(tmp_path / "elsewhere" / "pool")
    assert np.array_equal(PatchPool.open(copy).patches[[3, 1]], expected[[3, 1]])

    # The pool alone moved: the absolute paths are tried next.
    shutil.move(tmp_path / "b" / "pool", tmp_path / "pool")
    shutil.move(tmp_path / "b", tmp_path / "a")
    alone = PatchPool.open(tmp_path / "pool")
    assert np.array_equal(alone.patches[:4], expected[:4])

    # A changed tile (another mtime) and a missing one: a one-line error naming the file.
    b03 = tmp_path / "a" / "tiles" / "product" / "B03.tif"
    stat = b03.stat()
    os.utime(b03, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError) as exc:
        PatchPool.open(tmp_path / "pool")
    text = one_line(exc)
    assert "B03.tif" in text and "changed" in text and "rebuild" in text
    os.utime(b03, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    PatchPool.open(tmp_path / "pool")
    b03.rename(b03.with_suffix(".bak"))
    with pytest.raises(DataError) as exc:
        PatchPool.open(tmp_path / "pool")
    text = one_line(exc)
    assert "B03.tif" in text and "missing" in text and "put the tiles back" in text


def test_tiles_store_needs_a_folder_and_tiles(tmp_path) -> None:
    with pytest.raises(ConfigError) as exc:
        PatchPool.from_tiles(CELL, 64, bands=["B02"], store="tiles", progress=False)
    assert "out=" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        PatchPool.from_tiles(CELL, 64, bands=["B02"], store="zarr", out=tmp_path)
    assert "zarr" in one_line(exc)


def test_cli_build_and_info_show_the_disk_used(tmp_path) -> None:
    runner = CliRunner()
    common = ["--patch-size", "32", "--cloud-mask", "none"]
    result = runner.invoke(
        app, ["pool", "build", str(CELL), "--out", str(tmp_path / "t"), "--store", "tiles", *common]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pool", "build", str(CELL), "--out", str(tmp_path / "a"), *common])
    assert result.exit_code == 0, result.output
    info_t = runner.invoke(app, ["pool", "info", str(tmp_path / "t")])
    info_a = runner.invoke(app, ["pool", "info", str(tmp_path / "a")])
    assert info_t.exit_code == 0 and info_a.exit_code == 0, info_t.output + info_a.output
    assert "store:       tiles" in info_t.output and "of tiles read" in info_t.output
    assert "store:       array" in info_a.output and "pool directory" in info_a.output
    tiles_pool = PatchPool.open(tmp_path / "t")
    used = tiles_pool.disk_bytes()
    patches_npy = (tmp_path / "a" / PATCHES_FILE).stat().st_size
    assert used["pool"] * 10 < patches_npy, (used, patches_npy)
    assert used["tiles"] > 10e6  # the 12 band files of the cell
    assert np.array_equal(np.asarray(tiles_pool.patches), np.load(tmp_path / "a" / PATCHES_FILE))
    bad = runner.invoke(
        app, ["pool", "build", str(tmp_path / "a"), "--out", "x", "--store", "tiles"]
    )
    assert isinstance(bad.exception, ConfigError) and "--store tiles" in str(bad.exception)


class BrightnessAnnotator(Annotator):
    """A scripted expert: similar when the mean red reflectance differs by less than 100."""

    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Any:
        red = pool.bands.index("B04")
        ids = np.unique(pairs)
        values = np.zeros(len(pool))
        values[ids] = pool.float_patches(ids)[:, red].mean(axis=(1, 2))
        for i, j in pairs.tolist():
            yield int(abs(values[i] - values[j]) < 100)


def test_an_engine_session_embeds_the_same_on_both_stores(tmp_path) -> None:
    array_dir, tiles_dir = tmp_path / "array", tmp_path / "tiles"
    PatchPool.from_tiles(CELL, 64, bands=TEN_M, progress=False).save(array_dir)
    PatchPool.from_tiles(CELL, 64, bands=TEN_M, progress=False, store="tiles", out=tiles_dir)
    plugins.register(BrightnessAnnotator, name="brightness-script")
    embeddings = []
    try:
        for name, pool_dir in (("array", array_dir), ("tiles", tiles_dir)):
            config = SessionConfig(
                data=str(pool_dir),
                annotator="brightness-script",
                rounds=1,
                budget=8,
                initial=16,
                epochs=3,
                embedding_dim=16,
            )
            session = Session.create(tmp_path / f"s-{name}", config, {"pool_dir": str(pool_dir)})
            pool = PatchPool.open(pool_dir)
            with Engine(session, pool, progress=False) as engine:
                # Once the features are cached, the tiles' files are let go until needed.
                if isinstance(engine.pool.patches, TileWindows):
                    assert not engine.pool.patches._handles._open
                engine.run()
                embeddings.append(np.asarray(engine.embeddings))
            picture = PatchRenderer(pool).pair(3, 200)
            assert picture.dtype == np.uint8 and picture.shape[2] == 3
    finally:
        plugins.unregister("brightness-script", "annotators")
    assert np.array_equal(embeddings[0], embeddings[1])
    array_pool, tiles_pool = PatchPool.open(array_dir), PatchPool.open(tiles_dir)
    assert np.array_equal(
        PatchRenderer(array_pool).pair(3, 200), PatchRenderer(tiles_pool).pair(3, 200)
    )
    # Export, the session report, `index` and `embed` read the tiles store unchanged.
    cards = [
        read_card(export_model(tmp_path / f"s-{k}", tmp_path / f"m-{k}"))
        for k in ("array", "tiles")
    ]
    assert cards[0]["input"] == cards[1]["input"]
    runner = CliRunner()
    page = tmp_path / "report.html"
    report = runner.invoke(
        app, ["session", "report", str(tmp_path / "s-tiles"), "--out", str(page)]
    )
    assert report.exit_code == 0, report.output
    assert page.stat().st_size > 1000
    outputs = []
    for name, pool_dir in (("array", array_dir), ("tiles", tiles_dir)):
        for command in (
            ["index", str(pool_dir), "--out", str(tmp_path / f"i-{name}")],
            ["embed", str(pool_dir), "--out", str(tmp_path / f"e-{name}.npy")],
        ):
            result = runner.invoke(app, command)
            assert result.exit_code == 0, result.output
        outputs.append(np.load(tmp_path / f"e-{name}.npy"))
    assert np.array_equal(outputs[0], outputs[1])
    found = [
        GeoIndex.load(tmp_path / f"i-{name}").query_patch(5, k=4)["patch_id"].tolist()
        for name in ("array", "tiles")
    ]
    assert found[0] == found[1] and len(found[0]) == 4


def test_float_tiles_statistics_and_nan(tmp_path) -> None:
    product = tmp_path / "tiles" / "product"
    product.mkdir(parents=True)
    for band in ("B04", "B08"):
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            profile, data = src.profile, src.read(1).astype(np.float32) / 10000
        profile.update(dtype="float32")
        with rasterio.open(product / f"{band}.tif", "w", **profile) as dst:
            dst.write(data, 1)
    options: dict[str, Any] = {"bands": ["B04", "B08"], "progress": False}
    array = PatchPool.from_tiles(product.parent, 64, **options)
    tiles = PatchPool.from_tiles(product.parent, 64, store="tiles", out=tmp_path / "p", **options)
    assert array.patches.dtype == np.float32 == tiles.patches.dtype
    assert np.array_equal(np.asarray(PatchPool.open(tmp_path / "p").patches), array.patches)
    assert np.allclose(tiles.band_mean, array.band_mean, rtol=1e-12)
    assert np.allclose(tiles.band_std, array.band_std, rtol=1e-12)
    with rasterio.open(product / "B08.tif", "r+") as dst:
        data = dst.read(1)
        data[100:104, 200:204] = np.nan
        dst.write(data, 1)
    with pytest.raises(DataError) as exc:
        PatchPool.from_tiles(product.parent, 64, store="tiles", out=tmp_path / "q", **options)
    text = one_line(exc)
    assert "NaN" in text and "--store array" in text


def _as_float32_pool_of_before(directory: Path) -> None:
    """Rewrite a saved uint16 pool as the float32 pool the same tiles gave before pools kept
    the tiles' integer dtype for resampled bands (the same values)."""
    patches = np.load(directory / PATCHES_FILE)
    np.save(directory / PATCHES_FILE, patches.astype(np.float32))
    meta = json.loads((directory / POOL_FILE).read_text())
    meta["dtype"] = np.dtype(np.float32).str
    meta.pop("fingerprint", None)
    (directory / POOL_FILE).write_text(json.dumps(meta))


def test_a_session_on_a_float32_pool_of_before_accepts_its_uint16_rebuild(tmp_path) -> None:
    bands = ["B05", "B04"]  # B05 is resampled from 20 m onto the 10 m grid
    pool_dir = tmp_path / "pool"
    fresh = PatchPool.from_tiles(CELL, 120, bands=bands, cloud_mask=None, progress=False)
    assert fresh.patches.dtype == np.uint16
    fresh.save(pool_dir)
    _as_float32_pool_of_before(pool_dir)
    before = PatchPool.open(pool_dir)
    assert before.patches.dtype == np.float32 and before.fingerprint != fresh.fingerprint
    config = SessionConfig(
        data=str(pool_dir), annotator="brightness-script", rounds=1, budget=8, initial=16,
        epochs=3, embedding_dim=16,
    )  # fmt: skip
    plugins.register(BrightnessAnnotator, name="brightness-script")
    try:
        session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
        with Engine(session, before, progress=False) as engine:
            engine.run()
            embeddings = np.asarray(engine.embeddings)
        runner = CliRunner()
        assert runner.invoke(app, ["index", str(tmp_path / "s")]).exit_code == 0
        shutil.rmtree(pool_dir)  # the pool rebuilt from the same tiles: uint16 now
        PatchPool.from_tiles(CELL, 120, bands=bands, cloud_mask=None, progress=False).save(
            pool_dir
        )
        rebuilt = PatchPool.open(pool_dir)
        assert rebuilt.has_fingerprint(before.fingerprint)
        with Engine(Session.open(tmp_path / "s"), rebuilt, progress=False) as engine:
            assert np.array_equal(np.asarray(engine.embeddings), embeddings)
        geo = GeoIndex.load(tmp_path / "s")
        try:
            assert len(geo.query_patch(0, 5)) == 5
        finally:
            geo.close()
        # Another pool is still refused, whatever its dtype.
        other = PatchPool.from_tiles(CELL, 120, bands=["B06", "B04"], cloud_mask=None,
                                     progress=False)  # fmt: skip
        assert not other.has_fingerprint(before.fingerprint)
        with pytest.raises(SessionError, match="answers about another pool"):
            Engine(Session.open(tmp_path / "s"), other, progress=False)
    finally:
        plugins.unregister("brightness-script", "annotators")


def test_an_engine_embeds_from_its_saved_features_what_it_embedded_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine writes the trunk features to the session, lets them go, and reads them
    # back into the first embedding a block of rows at a time (as a resumed session does):
    # the embedding, and so the pairs chosen from it, are those of the features held.
    import copy

    from anneal_geo.training import SharedFeatures, Trainer
    from anneal_geo.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_NORMALISE_BLOCK", 256)  # 1,089 patches: 5 blocks
    pool_dir = tmp_path / "pool"
    PatchPool.from_tiles(CELL, 32, progress=False, store="tiles", out=pool_dir)
    pool = PatchPool.open(pool_dir)
    plugins.register(BrightnessAnnotator, name="brightness-script")
    try:
        config = SessionConfig(
            data=str(pool_dir), annotator="brightness-script", rounds=2, budget=8, initial=16
        )
        session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
        with Engine(session, pool, progress=False) as engine:
            first = engine.embeddings.copy()
            pairs = engine.round_pairs()
            assert isinstance(engine.trainer.features, SharedFeatures)
            model = copy.deepcopy(engine.trainer.model)
        (cache,) = session.directory.glob("trunk_features_*.npy")
        held = Trainer(model, mode="head", progress=False)
        held.set_features(np.load(cache))
        from_memory = np.empty_like(first)
        assert held.share_features(from_memory) is True
        np.testing.assert_array_equal(first, from_memory)
        for read_only in (False, True):
            with Engine(
                Session.open(session.directory), pool, progress=False, read_only=read_only
            ) as engine:
                np.testing.assert_array_equal(engine.embeddings, first)
                np.testing.assert_array_equal(engine.round_pairs(), pairs)
        # A session whose pairs are chosen afresh from the resumed embedding chooses the same.
        session.pending_path.unlink()
        with Engine(Session.open(session.directory), pool, progress=False) as engine:
            np.testing.assert_array_equal(engine.round_pairs(), pairs)
            # Looking at the patches opens their tiles; choosing the next round's pairs lets
            # them go (with the blocks GDAL cached) before its neighbour search.
            for (i, j), value in zip(
                pairs.tolist(), engine.annotator.checked_annotate(pairs, engine.pool), strict=True
            ):
                engine.answer(i, j, value)
            assert engine.pool.patches._handles._open
            engine.finish_round()
            engine.round_pairs()
            assert not engine.pool.patches._handles._open
    finally:
        plugins.unregister("brightness-script", "annotators")
