"""Footprints of big pools: written chunk by chunk by a tiles-store build, and looked up
(rows by id, patches in an area, the extent) from footprints.gpkg without reading all of it,
on the real Major TOM cell; the answers equal those of the footprints held in memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
import shapely

from anneal_geo.data import footprints as footprints_module
from anneal_geo.data import pool as pool_module
from anneal_geo.data import tiles as tiles_module
from anneal_geo.data.footprints import (
    LAYER,
    build_footprints,
    footprint_ids_intersecting,
    read_footprint_rows,
    read_footprints,
    write_footprints,
)
from anneal_geo.data.pool import FOOTPRINTS_FILE, PatchPool
from anneal_geo.data.sources import GeoRef
from anneal_geo.errors import DataError
from anneal_geo.retrieval.filters import SearchFilter
from anneal_geo.retrieval.geoindex import GeoIndex, build_index

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
TEN_M = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchPool, Path]:
    """(the array-store pool, a tiles-store pool folder whose footprints were written 7
    patches at a time, with an index)."""
    array = PatchPool.from_tiles(CELL, 64, bands=TEN_M, progress=False)
    out = tmp_path_factory.mktemp("lookups") / "pool"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiles_module, "FOOTPRINT_CHUNK_ROWS", 7)
        PatchPool.from_tiles(CELL, 64, bands=TEN_M, progress=False, store="tiles", out=out)
    build_index(out)
    return array, out


@pytest.fixture
def from_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pool counts as big: lookups read footprints.gpkg."""
    monkeypatch.setattr(pool_module, "FOOTPRINTS_IN_MEMORY", 0)


def test_chunked_footprints_equal_the_whole_frame(built) -> None:
    array, out = built
    n = len(array)
    assert n > 3 * 7  # several chunks, the last one short
    written, whole = read_footprints(out / FOOTPRINTS_FILE), array.footprints
    assert list(written.columns) == list(whole.columns) and len(written) == n
    for column in ("patch_id", "source", "crs", "row_off", "col_off", "height", "width"):
        assert written[column].tolist() == whole[column].tolist(), column
    assert written["geometry_native"].tolist() == whole["geometry_native"].tolist()
    assert written.geometry.to_wkt().tolist() == whole.geometry.to_wkt().tolist()
    assert written["label"].isna().all()
    # Feature ids follow patch ids, which is what the lookups by id rely on.
    fids = pyogrio.read_dataframe(out / FOOTPRINTS_FILE, layer=LAYER, fid_as_index=True).index
    assert np.array_equal(fids.to_numpy(), np.arange(1, n + 1))


def test_lookups_from_the_file_equal_those_in_memory(built, from_file) -> None:
    array, out = built
    whole = array.footprints
    pool = PatchPool.open(out)
    assert pool.georeferenced
    ids = np.array([40, 3, 3, len(pool) - 1, 0])  # unordered, repeated, both ends
    rows = pool.footprint_rows(ids)
    assert rows["patch_id"].tolist() == ids.tolist()
    expected = whole.iloc[ids].reset_index(drop=True)
    assert rows.geometry.to_wkt().tolist() == expected.geometry.to_wkt().tolist()
    assert rows["row_off"].tolist() == expected["row_off"].tolist()
    none = pool.footprint_rows([])
    assert len(none) == 0 and list(none.columns) == list(whole.columns)
    area = shapely.union_all(whole.geometry.iloc[[5, 6, 21]].to_numpy()).buffer(-1e-4)
    hits = pool.patches_intersecting(area)
    in_memory = np.sort(whole["patch_id"].to_numpy()[whole.sindex.query(area, "intersects")])
    assert hits.tolist() == in_memory.tolist() and {5, 6, 21} <= set(hits.tolist())
    assert pool.patches_intersecting(shapely.box(0.0, 0.0, 1.0, 1.0)).size == 0
    np.testing.assert_allclose(pool.footprint_bounds(), whole.total_bounds, atol=1e-9)
    # None of that read every footprint into memory.
    assert pool._footprints is None


def test_queries_answer_the_same_from_the_file(built, monkeypatch) -> None:
    array, out = built
    whole = array.footprints
    centre = whole.geometry.iloc[37].centroid
    box = shapely.union_all(whole.geometry.iloc[[0, 1]].to_numpy()).buffer(-1e-4).bounds
    west, south, east, north = whole.geometry.iloc[[8, 30]].total_bounds
    within = SearchFilter.from_options(within=f"{west},{south},{east},{north}")
    assert within is not None

    def answers() -> list[Any]:
        index = GeoIndex.load(out)
        try:
            got = [
                index.query_patch(37, k=6),
                index.query_point(centre.x, centre.y, k=6),
                index.query_bbox(*box, k=6),
                index.query_patch(37, k=6, filters=within),
            ]
            with pytest.raises(DataError) as exc:
                index.query_point(10.0, 50.0)
            got.append(str(exc.value))
            got.append(index.pool._footprints is None)
            return got
        finally:
            index.close()

    in_memory = answers()
    monkeypatch.setattr(pool_module, "FOOTPRINTS_IN_MEMORY", 0)
    on_file = answers()
    assert in_memory[-1] is False and on_file[-1] is True  # the file was never read whole
    assert on_file[-2] == in_memory[-2] and "lies outside every patch footprint" in on_file[-2]
    for mine, theirs in zip(on_file[:4], in_memory[:4], strict=True):
        for column in ("patch_id", "row_off", "col_off", "crs", "source"):
            assert mine[column].tolist() == theirs[column].tolist(), column
        assert mine.geometry.to_wkt().tolist() == theirs.geometry.to_wkt().tolist()
        assert mine.attrs["query"] == theirs.attrs["query"]
    assert set(on_file[3]["patch_id"]) <= set(within.allowed(array).tolist())


def test_rows_of_a_file_not_in_patch_order_and_missing_rows(built, tmp_path) -> None:
    array, _ = built
    shuffled = array.footprints.iloc[::-1].reset_index(drop=True)
    path = tmp_path / "reversed.gpkg"
    write_footprints(shuffled, path)
    rows = read_footprint_rows(path, [2, 9, 2])
    assert rows["patch_id"].tolist() == [2, 9, 2]
    expected = array.footprints.iloc[[2, 9, 2]]
    assert rows.geometry.to_wkt().tolist() == expected.geometry.to_wkt().tolist()
    with pytest.raises(DataError) as exc:
        read_footprint_rows(path, [1, len(array) + 5])
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "lacks the footprints" in message


def test_georefs_kept_as_arrays_index_like_a_list() -> None:
    read = tiles_module.read_tiles(CELL, 64, bands=TEN_M, progress=False, keep_pixels=False)
    georefs = read.georefs
    assert isinstance(georefs, tiles_module.GeoRefs)
    listed = [georefs[i] for i in range(len(georefs))]
    assert all(isinstance(g, GeoRef) for g in listed)
    assert listed[3].crs == read.crs[3] and listed[3].height == 64
    assert georefs == listed and georefs[2:9] == listed[2:9]
    picked = np.array([7, 1, 1, 30])
    assert georefs[picked] == [listed[i] for i in picked]
    assert georefs[2:9] != listed[3:10]
    # The windows' footprints equal those built patch by patch from the same GeoRefs.
    one_by_one = build_footprints(listed, read.sources, [None] * len(listed))
    frame = read.footprints()
    assert frame.geometry.to_wkt().tolist() == one_by_one.geometry.to_wkt().tolist()


def _has_spatial_index(path: Path) -> bool:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'rtree_%'").fetchall()
    return bool(rows)


def test_small_layers_are_written_without_a_spatial_index(built, tmp_path, monkeypatch) -> None:
    """Below SPATIAL_INDEX_MIN_ROWS footprints.gpkg has no R-tree (the layer is read whole);
    at or above it, it has one; area look-ups through the file answer the same either way."""
    array, _ = built
    frame = array.footprints
    small, big = tmp_path / "small.gpkg", tmp_path / "big.gpkg"
    write_footprints(frame, small)
    monkeypatch.setattr(footprints_module, "SPATIAL_INDEX_MIN_ROWS", len(frame))
    write_footprints(frame, big)
    assert not _has_spatial_index(small) and _has_spatial_index(big)
    area = shapely.union_all(frame.geometry.iloc[[5, 6, 21]].to_numpy()).buffer(-1e-4)
    expected = np.sort(frame["patch_id"].to_numpy()[frame.sindex.query(area, "intersects")])
    for path in (small, big):
        assert footprint_ids_intersecting(path, area).tolist() == expected.tolist()
        back = read_footprints(path)
        assert back.geometry.to_wkt().tolist() == frame.geometry.to_wkt().tolist()
    # A tiles-store build writes in chunks: its index follows the whole layer's size.
    out = tmp_path / "chunked"
    monkeypatch.setattr(tiles_module, "FOOTPRINT_CHUNK_ROWS", 50)
    PatchPool.from_tiles(CELL, 64, bands=TEN_M, progress=False, store="tiles", out=out)
    assert _has_spatial_index(out / FOOTPRINTS_FILE)


def test_written_footprints_read_back_equal_with_labels(built, tmp_path) -> None:
    """Text labels and missing ones, and a frame read back from a GeoPackage (pandas'
    string columns) written again, all read back equal."""
    array, _ = built
    frame = array.footprints.copy()
    labels = [None if i % 3 == 0 else f"class {i % 5}" for i in range(len(frame))]
    frame["label"] = labels
    first, second = tmp_path / "first.gpkg", tmp_path / "second.gpkg"
    write_footprints(frame, first)
    back = read_footprints(first)
    assert [None if pd_isna(v) else v for v in back["label"]] == labels
    for column in ("patch_id", "source", "crs", "row_off", "col_off", "height", "width"):
        assert back[column].tolist() == frame[column].tolist(), column
    assert back["geometry_native"].tolist() == frame["geometry_native"].tolist()
    assert back.crs == frame.crs and set(back.geom_type) == {"Polygon"}
    write_footprints(back, second)
    assert read_footprints(second).equals(back)
    info = pyogrio.read_info(second, layer=LAYER)
    assert info["geometry_type"] == "Polygon" and info["crs"] == "EPSG:4326"
    assert dict(zip(info["fields"], info["dtypes"], strict=True))["patch_id"] == "int64"


def pd_isna(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
