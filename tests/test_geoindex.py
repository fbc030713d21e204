"""The retrieval index on the real Major TOM cell: building, exact and HNSW search, queries
by patch, point, box and image, GeoPackage/GeoJSON export, the plot, sessions, bad input and
the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.windows import Window
from typer.testing import CliRunner

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.cli import app
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval.geoindex import (
    INDEX_FILE,
    META_FILE,
    RESULT_COLUMNS,
    SESSION_EMBEDDINGS_FILE,
    GeoIndex,
    build_index,
    export_results,
    plot_results,
)
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("geo") / "majortom"
    PatchPool.from_tiles(CELL, 64, bands=BANDS, progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def index(pool_dir) -> GeoIndex:
    build_index(pool_dir)
    return GeoIndex.load(pool_dir)


def exact_neighbours(vectors: np.ndarray, query: np.ndarray, skip: list[int]) -> np.ndarray:
    distances = np.linalg.norm(vectors - query[None], axis=1)
    distances[skip] = np.inf
    return np.argsort(distances, kind="stable")


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def write_window(path: Path, row: int, col: int, size: int, bands: list[str]) -> None:
    """The cell's pixels in one window, as a multi-band GeoTIFF named by band."""
    data = []
    for band in bands:
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            window = Window(col, row, size, size)
            data.append(src.read(1, window=window))
            profile = src.profile
            transform = src.window_transform(window)
    profile.update(count=len(bands), width=size, height=size, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack(data))
        dst.descriptions = tuple(bands)


def test_bare_pool_index_files_and_standardised_features(index, pool_dir) -> None:
    meta = json.loads((pool_dir / META_FILE).read_text())
    assert (pool_dir / INDEX_FILE).is_file()
    pool = index.pool
    assert meta["kind"] == "flat" and meta["n"] == 256 and meta["ids"] == {"start": 0, "stop": 256}
    assert meta["pool_fingerprint"] == pool.fingerprint
    assert meta["pool_dir"] == str(pool_dir.resolve())
    assert meta["embedder"]["kind"] == "spectral" and meta["embedder"]["bands"] == BANDS
    vectors = index.vectors(np.arange(len(pool)))
    assert vectors.shape == (256, meta["dim"])
    np.testing.assert_allclose(vectors.mean(axis=0), 0.0, atol=1e-4)
    spread = vectors.std(axis=0)
    assert np.all((np.abs(spread - 1.0) < 1e-3) | (spread < 1e-6))  # unit variance or constant


def test_query_by_patch_is_exact_search_without_the_query(index) -> None:
    vectors = index.vectors(np.arange(len(index)))
    results = index.query_patch(37, k=10)
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert results["rank"].tolist() == list(range(1, 11))
    expected = exact_neighbours(vectors, vectors[37], [37])[:10]
    assert results["patch_id"].tolist() == expected.tolist()
    np.testing.assert_allclose(
        results["distance"], np.linalg.norm(vectors[expected] - vectors[37], axis=1), rtol=1e-4
    )
    fp = index.pool.footprints.iloc[expected]
    for column in ("row_off", "col_off", "height", "width", "source", "crs"):
        assert results[column].tolist() == fp[column].tolist()
    assert results.geometry.geom_equals_exact(fp.geometry.reset_index(drop=True), 1e-12).all()
    assert results.crs.to_epsg() == 4326
    with_itself = index.query_patch(37, k=3, include_query=True)
    assert with_itself["patch_id"].iloc[0] == 37 and with_itself["distance"].iloc[0] < 1e-3


def test_query_by_point_uses_the_patch_under_it(index) -> None:
    centre = index.pool.footprints.geometry.iloc[37].centroid
    assert index.patch_at(centre.x, centre.y) == 37
    by_point = index.query_point(centre.x, centre.y, k=5)
    assert by_point["patch_id"].tolist() == index.query_patch(37, k=5)["patch_id"].tolist()
    assert by_point.attrs["query"]["patch_ids"] == [37]
    with pytest.raises(DataError) as exc:
        index.query_point(10.0, 50.0)
    assert "lies outside every patch footprint" in one_line(exc)
    with pytest.raises(DataError) as exc:
        index.query_point(17.9, 103.75)  # LAT,LON swapped
    assert "give LON,LAT" in one_line(exc)


def test_query_by_box_averages_the_patches_inside(index) -> None:
    fp = index.pool.footprints
    corners = shapely.union_all(fp.geometry.iloc[[0, 1, 16, 17]].to_numpy()).buffer(-1e-4)
    results = index.query_bbox(*corners.bounds, k=8)
    inside = results.attrs["query"]["patch_ids"]
    assert inside == [0, 1, 16, 17]
    vectors = index.vectors(np.arange(len(index)))
    expected = exact_neighbours(vectors, vectors[inside].mean(axis=0), inside)[:8]
    assert results["patch_id"].tolist() == expected.tolist()
    with pytest.raises(DataError) as exc:
        index.query_bbox(0.0, 0.0, 1.0, 1.0)
    assert "overlaps no patch footprint" in one_line(exc)
    with pytest.raises(DataError):
        index.query_bbox(103.8, 17.9, 103.7, 18.0)  # west > east


def test_query_by_image_finds_the_patch_it_shows(index, tmp_path) -> None:
    row, col = index.pool.footprints.loc[37, ["row_off", "col_off"]]
    write_window(tmp_path / "patch.tif", int(row), int(col), 64, ["B08", "B04", "B03", "B02"])
    results = index.query_image(tmp_path / "patch.tif", k=3)
    assert results["patch_id"].iloc[0] == 37 and results["distance"].iloc[0] < 1e-3
    write_window(tmp_path / "big.tif", 22, 22, 128, BANDS)  # patches 0, 1, 16 and 17
    vectors = index.vectors(np.arange(len(index)))
    big = index.query_image(tmp_path / "big.tif", k=4)
    expected = exact_neighbours(vectors, vectors[[0, 1, 16, 17]].mean(axis=0), [])[:4]
    assert big["patch_id"].tolist() == expected.tolist()
    write_window(tmp_path / "rgb.tif", 22, 22, 64, ["B04", "B03", "B02"])
    with pytest.raises(DataError) as exc:
        index.query_image(tmp_path / "rgb.tif")
    assert "lacks band(s) B08" in one_line(exc)
    write_window(tmp_path / "small.tif", 22, 22, 32, BANDS)
    with pytest.raises(DataError) as exc:
        index.query_image(tmp_path / "small.tif")
    assert "smaller than the pool's 64 px patches" in one_line(exc)


def test_results_export_to_geopackage_and_geojson(index, tmp_path) -> None:
    results = index.query_patch(100, k=7)
    for name in ("results.gpkg", "results.geojson"):
        path = export_results(results, tmp_path / name)
        back = gpd.read_file(path)
        assert back.crs.to_epsg() == 4326
        assert back["patch_id"].tolist() == results["patch_id"].tolist()
        assert back["row_off"].tolist() == results["row_off"].tolist()
        assert back.geometry.geom_equals_exact(results.geometry, 1e-9).all()
    with pytest.raises(ConfigError):
        export_results(results, tmp_path / "results.csv")


def test_plot_shows_query_results_and_map(index, tmp_path) -> None:
    path = plot_results(index, index.query_point(103.75, 17.92, k=6), tmp_path / "quick.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_hnsw_index_saves_and_matches_exact_search(index, tmp_path) -> None:
    vectors = index.vectors(np.arange(len(index)))
    hnsw = GeoIndex.build(vectors, index.pool, embedder=index.meta["embedder"], kind="hnsw")
    hnsw.save(tmp_path)
    again = GeoIndex.load(tmp_path, pool=index.pool)
    assert again.kind == "hnsw" and again.meta["hnsw"]["ef_search"] == 128
    for pid in (0, 37, 200):
        assert (
            again.query_patch(pid, k=10)["patch_id"].tolist()
            == index.query_patch(pid, k=10)["patch_id"].tolist()
        )


def test_an_index_from_another_pool_is_refused(index, tmp_path) -> None:
    other = PatchPool.from_tiles(CELL, 64, bands=["B04", "B03", "B02", "B08"], progress=False)
    with pytest.raises(DataError) as exc:
        GeoIndex.load(index.path, pool=other)
    assert "was built from another pool" in one_line(exc)
    other.save(tmp_path / "other")
    for name in (INDEX_FILE, META_FILE):
        (tmp_path / "other" / name).write_bytes((index.path / name).read_bytes())
    meta = json.loads((tmp_path / "other" / META_FILE).read_text())
    meta["pool_dir"] = str(tmp_path / "other")
    (tmp_path / "other" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError) as exc:
        GeoIndex.load(tmp_path / "other")
    assert "was built from another pool" in one_line(exc)


def test_a_corrupt_index_is_refused(index, tmp_path) -> None:
    for name in (INDEX_FILE, META_FILE):
        (tmp_path / name).write_bytes((index.path / name).read_bytes())
    data = bytearray((tmp_path / INDEX_FILE).read_bytes())
    data[100:140] = b"\xff" * 40
    (tmp_path / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        GeoIndex.load(tmp_path)
    assert "is corrupt" in one_line(exc)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["faiss_sha256"]  # without the checksum faiss itself must notice
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    (tmp_path / INDEX_FILE).write_bytes(b"not a faiss index at all" * 10)
    with pytest.raises(DataError) as exc:
        GeoIndex.load(tmp_path)
    assert "is corrupt" in one_line(exc)
    (tmp_path / META_FILE).write_text('{"format": "anneal-geo-index", "vers')
    with pytest.raises(DataError) as exc:
        GeoIndex.load(tmp_path)
    assert "is corrupt" in one_line(exc)
    with pytest.raises(DataError) as exc:
        GeoIndex.load(tmp_path / "nowhere")
    assert "does not exist" in one_line(exc)
    with pytest.raises(DataError) as exc:
        GeoIndex.load(ROOT / "sample_tiles")
    assert "holds no index" in one_line(exc)


class GreennessAnnotator(Annotator):
    """Answers from the NDVI of the two patches: a stand-in for a person on unlabelled
    tiles (the simulated oracle needs labels)."""

    def annotate(self, pairs, pool):
        ids = np.unique(pairs)
        patches = pool.float_patches(ids)
        red, nir = patches[:, pool.bands.index("B04")], patches[:, pool.bands.index("B08")]
        ndvi = np.zeros(len(pool))
        ndvi[ids] = ((nir - red) / (nir + red)).mean(axis=(1, 2))
        for i, j in pairs.tolist():
            yield int(abs(ndvi[i] - ndvi[j]) < 0.05)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_fills_from_a_saved_file_in_blocks(index, tmp_path, monkeypatch, kind) -> None:
    import anneal_geo.retrieval.geoindex as geoindex

    monkeypatch.setattr(geoindex, "_ADD_BLOCK", 100)  # three blocks of the 256 patches
    vectors = index.vectors(np.arange(len(index)))
    saved = tmp_path / "emb.npy"
    np.save(saved, vectors)
    embedder = index.meta["embedder"]
    built = GeoIndex.build(saved, index.pool, embedder=embedder, kind=kind)
    assert len(built) == len(index) and built.kind == kind
    np.testing.assert_array_equal(built.vectors(np.arange(len(index))), vectors)
    for pid in (0, 37, 200, len(index) - 1):
        assert (
            built.query_patch(pid, k=10)["patch_id"].tolist()
            == index.query_patch(pid, k=10)["patch_id"].tolist()
        )
    # A damaged file is named, never indexed in part.
    cut = tmp_path / "cut.npy"
    cut.write_bytes(saved.read_bytes()[: -4 * vectors.shape[1] * 3])
    with pytest.raises(DataError) as exc:
        GeoIndex.build(cut, index.pool, embedder=embedder, kind=kind)
    assert str(cut) in one_line(exc) and "ends before its" in one_line(exc)
    np.save(tmp_path / "wide.npy", vectors.astype(np.float64))
    with pytest.raises(DataError) as exc:
        GeoIndex.build(tmp_path / "wide.npy", index.pool, embedder=embedder, kind=kind)
    assert "float64" in one_line(exc) and "float32" in one_line(exc)
    bad = vectors.copy()
    bad[250, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError) as exc:
        GeoIndex.build(tmp_path / "nan.npy", index.pool, embedder=embedder, kind=kind)
    assert "nan.npy" in one_line(exc) and "NaN" in one_line(exc)


def test_a_session_index_uses_the_session_embeddings(pool_dir, tmp_path) -> None:
    plugins.register(GreennessAnnotator, name="greenness")
    try:
        config = SessionConfig(
            data=str(pool_dir),
            annotator="greenness",
            rounds=1,
            budget=10,
            initial=20,
            epochs=5,
            embedding_dim=32,
        )
        session = Session.create(tmp_path / "session", config, {"pool_dir": str(pool_dir)})
        pool = PatchPool.open(pool_dir)
        with Engine(session, pool, progress=False) as engine:
            engine.run()
            embeddings = engine.embeddings
        built = build_index(session.directory)
        assert built.path == session.directory and (session.directory / INDEX_FILE).is_file()
        assert not (session.directory / SESSION_EMBEDDINGS_FILE).exists()  # filled from it
        assert built.meta["embedder"] == {
            "kind": "session",
            "session": str(session.directory.resolve()),
            "round": 1,
            "bands": BANDS,
            "query_expansion": 5,
        }
        geo = GeoIndex.load(session.directory)
        np.testing.assert_allclose(geo.vectors(np.arange(len(pool))), embeddings, atol=1e-6)
        # Searches expand the query as the session's evaluation does: patch 7 averaged with
        # its 5 nearest other patches, then ranked; inside an area the neighbours still come
        # from the whole pool.
        vectors = geo.vectors(np.arange(len(pool)))
        near = exact_neighbours(vectors, vectors[7], [7])[:5]
        expanded = (vectors[7] + vectors[near].sum(axis=0)) / 6
        assert geo.query_patch(7, k=8)["patch_id"].tolist() == exact_neighbours(
            vectors, expanded, [7]
        )[:8].tolist()
        allowed = np.arange(100, 200)
        _, inside = geo.search(vectors[7], 4, exclude=np.array([7]), allowed=allowed)
        order = exact_neighbours(vectors, expanded, [7])
        assert inside.tolist() == order[np.isin(order, allowed)][:4].tolist()
        _, plain = geo.search(vectors[7], 8, exclude=np.array([7]), query_expansion=0)
        assert plain.tolist() == exact_neighbours(vectors, vectors[7], [7])[:8].tolist()
        with pytest.raises(ConfigError, match="query_expansion=-1 is not a whole number"):
            geo.search(vectors[7], 4, query_expansion=-1)
        del geo.meta["embedder"]["query_expansion"]  # an index saved before the setting
        assert geo.query_expansion == 0
        geo.meta["embedder"]["query_expansion"] = 5
        row, col = pool.footprints.loc[200, ["row_off", "col_off"]]
        write_window(tmp_path / "patch.tif", int(row), int(col), 64, BANDS)
        results = geo.query_image(tmp_path / "patch.tif", k=3, query_expansion=0)
        assert results["patch_id"].iloc[0] == 200 and results["distance"].iloc[0] < 1e-3
        assert results.attrs["query"]["query_expansion"] == 0
        expanded = geo.query_image(tmp_path / "patch.tif", k=3)
        geo.close()
        assert expanded.attrs["query"]["query_expansion"] == 5
        # The image's embedding is patch 200's: expanded as patch 200 is with itself kept.
        own = geo.query_patch(200, k=3, include_query=True)
        assert expanded["patch_id"].tolist() == own["patch_id"].tolist()
        assert geo.staleness() is None
        with Engine(session, pool, progress=False) as engine:
            engine.run(rounds=1)  # the session moves on: the index is now out of date
        assert "finished round 2 since this index was built (round 1)" in geo.staleness()
    finally:
        plugins.unregister("greenness", "annotators")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "anneal-geo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def test_command_line_pool_build_index_query(tmp_path) -> None:
    # In-process (the libraries are imported already); the error path below runs the real
    # executable, which turns errors into one line and exit status 2.
    runner = CliRunner()
    pool = tmp_path / "pools" / "majortom"
    built = runner.invoke(
        app,
        [
            "pool",
            "build",
            str(CELL),
            "--out",
            str(pool),
            "--patch-size",
            "128",
            "--bands",
            "B04,B03,B02,B08",
            "--max-nodata",
            "0.2",
        ],
    )
    assert built.exit_code == 0, built.output
    assert "kept 64, skipped 0 (0 mostly nodata, 0 mostly cloud" in built.output
    assert PatchPool.open(pool).bands == ["B04", "B03", "B02", "B08"]
    indexed = runner.invoke(app, ["index", str(pool)])
    assert indexed.exit_code == 0, indexed.output
    assert "indexed 64 patches" in indexed.output and "flat" in indexed.output
    out, png = tmp_path / "results.gpkg", tmp_path / "results.png"
    query = runner.invoke(
        app,
        [
            "query",
            str(pool),
            "--point",
            "103.75,17.92",
            "-k",
            "5",
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert query.exit_code == 0, query.output
    assert len(gpd.read_file(out)) == 5 and png.is_file()
    both = runner.invoke(app, ["query", str(pool), "--patch", "3", "--point", "103.75,17.92"])
    assert isinstance(both.exception, ConfigError) and "exactly one of" in str(both.exception)
    outside = cli("query", str(pool), "--point", "2.35,48.85")
    assert outside.returncode == 2
    assert outside.stderr.strip().count("\n") == 0 and "outside every patch" in outside.stderr
