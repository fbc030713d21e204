"""Searching within an area and a time window on real pools: the Major TOM cell (areas as
boxes and as polygons in another CRS, exact and HNSW indexes), BigEarthNet patches from
several dates, acquisition dates read at pool build, old pools without dates, and the
query's own layer in the results GeoPackage."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from typer.testing import CliRunner

from anneal_geo.cli import app
from anneal_geo.data.dates import acquisition_date
from anneal_geo.data.pool import PatchPool
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval.filters import SearchFilter
from anneal_geo.retrieval.geoindex import GeoIndex, build_index, export_results

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
BIGEARTHNET = ROOT / "sample_tiles" / "bigearthnet_s2_tiny"
BANDS = ["B02", "B03", "B04", "B08"]


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> GeoIndex:
    directory = tmp_path_factory.mktemp("filters") / "majortom"
    PatchPool.from_tiles(CELL, 64, bands=BANDS, progress=False).save(directory)
    build_index(directory)
    return GeoIndex.load(directory)


@pytest.fixture(scope="module")
def dated(tmp_path_factory) -> GeoIndex:
    directory = tmp_path_factory.mktemp("filters") / "bigearthnet"
    PatchPool.load(BIGEARTHNET).save(directory)
    build_index(directory)
    return GeoIndex.load(directory)


def nearest_among(index: GeoIndex, query: int, allowed: set[int], k: int) -> list[int]:
    vectors = index.vectors(np.arange(len(index)))
    distances = np.linalg.norm(vectors - vectors[query], axis=1)
    mask = np.array([i in allowed and i != query for i in range(len(index))])
    distances[~mask] = np.inf
    return np.argsort(distances, kind="stable")[:k].tolist()


def test_sentinel2_names_give_the_acquisition_date() -> None:
    product = next((CELL / "199U" / "199U_1099R").iterdir())
    assert acquisition_date(str(product / "B02.tif")) == "2020-02-23"
    granule = "GRANULE/L2A_T48QUE_A/IMG_DATA/R10m/T48QUE_20200223T032739_B04_10m.jp2"
    assert acquisition_date(granule) == "2020-02-23"
    assert acquisition_date("S2A_MSIL2A_20180510T94033_19_86/x_B02.tif") == "2018-05-10"
    assert acquisition_date("sample_tiles/eurosat_ms/Forest/Forest_1.tif") is None
    assert acquisition_date("S2B_MSIL2A_20201341T000000_N0001") is None  # not a date


def test_pools_record_dates_and_old_pools_still_open(index, dated, tmp_path) -> None:
    assert set(index.pool.acquired) == {"2020-02-23"}
    dates = dated.pool.acquired
    assert len(set(dates)) > 4 and all(d is not None for d in dates)
    meta = json.loads((dated.pool.path / "pool.json").read_text())
    assert meta["acquired"] == dates
    old = tmp_path / "old"
    PatchPool.open(dated.pool.path).save(old)
    meta = json.loads((old / "pool.json").read_text())
    del meta["acquired"]  # as a pool saved before dates were recorded
    (old / "pool.json").write_text(json.dumps(meta))
    reopened = PatchPool.open(old)
    assert reopened.acquired == dates  # taken from the source names
    assert reopened.fingerprint == dated.pool.fingerprint
    assert "acquired:    2017-06-17 (2)" in reopened.describe()
    meta["acquired"] = ["yesterday"] * len(dates)
    (old / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as exc:
        PatchPool.open(old)
    assert "is not an ISO date" in one_line(exc)


def test_within_a_box_filters_before_ranking(index) -> None:
    footprints = index.pool.footprints
    corner = shapely.union_all(footprints.geometry.iloc[[0, 1, 2, 16, 17, 18]].to_numpy())
    bounds = corner.buffer(-1e-4).bounds
    area = SearchFilter.from_options(",".join(str(v) for v in bounds))
    allowed = set(area.allowed(index.pool).tolist())
    # The UTM grid is turned against lon/lat: the box also grazes a neighbour or two.
    expected = footprints.index[footprints.intersects(shapely.box(*bounds))].tolist()
    assert allowed == set(expected) and {0, 1, 2, 16, 17, 18} <= allowed and len(allowed) < 10
    results = index.query_patch(200, k=4, filters=area)
    assert results["patch_id"].tolist() == nearest_among(index, 200, allowed, 4)
    assert results["rank"].tolist() == [1, 2, 3, 4]  # k results, though none is near 200
    unfiltered = index.query_patch(200, k=4)
    assert not set(unfiltered["patch_id"]) <= allowed
    few = index.query_patch(0, k=10, filters=area)
    assert sorted(few["patch_id"]) == sorted(allowed - {0})  # all there are, less the query
    inner = footprints.geometry.iloc[200].buffer(-1e-4).bounds
    box = index.query_bbox(*inner, k=3, filters=area)
    assert set(box["patch_id"]) <= allowed and len(box) == 3


def test_within_a_polygon_file_in_another_crs(index, tmp_path) -> None:
    footprints = index.pool.footprints
    native = gpd.GeoSeries(footprints.geometry.iloc[[120, 121, 137]], crs="EPSG:4326")
    utm = native.to_crs("EPSG:32648")
    centres = utm.centroid
    triangle = shapely.Polygon([(p.x, p.y) for p in centres])  # touches exactly these three
    gpd.GeoDataFrame({"name": ["area"]}, geometry=[triangle], crs="EPSG:32648").to_file(
        tmp_path / "area.gpkg"
    )
    area = SearchFilter.from_options(tmp_path / "area.gpkg")
    inside = set(area.allowed(index.pool).tolist())
    assert {120, 121, 137} <= inside and len(inside) <= 6
    lonlat = gpd.GeoSeries([triangle], crs="EPSG:32648").to_crs("EPSG:4326")
    expected = set(footprints.index[footprints.intersects(lonlat.iloc[0])].tolist())
    assert inside == expected
    results = index.query_patch(10, k=3, filters=area)
    assert set(results["patch_id"]) <= inside
    (tmp_path / "plain.geojson").write_text(
        json.dumps({"type": "Polygon", "coordinates": [list(lonlat.iloc[0].exterior.coords)]})
    )
    assert set(SearchFilter.from_options(tmp_path / "plain.geojson").allowed(index.pool)) == inside
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame(geometry=[triangle]).to_file(tmp_path / "nocrs.gpkg")
    with pytest.raises(DataError) as exc:
        SearchFilter.from_options(tmp_path / "nocrs.gpkg")
    assert "has no CRS" in one_line(exc)
    with pytest.raises(DataError) as exc:
        SearchFilter.from_options(tmp_path / "missing.gpkg")
    assert "no such file" in one_line(exc)
    far = SearchFilter.from_options("2.30,48.80,2.40,48.90")
    with pytest.raises(DataError) as exc:
        far.allowed(index.pool)
    assert "no patch of the pool intersects" in one_line(exc)


def test_a_filtered_hnsw_search_still_returns_k(index, tmp_path) -> None:
    vectors = index.vectors(np.arange(len(index)))
    hnsw = GeoIndex.build(vectors, index.pool, embedder=index.meta["embedder"], kind="hnsw")
    footprints = index.pool.footprints
    corner = shapely.union_all(footprints.geometry.iloc[[240, 241, 255]].to_numpy())
    area = SearchFilter.from_options(",".join(str(v) for v in corner.bounds))
    allowed = set(area.allowed(index.pool).tolist())
    for query in (0, 37, 100):
        got = hnsw.query_patch(query, k=5, filters=area)
        assert got["patch_id"].tolist() == nearest_among(index, query, allowed, 5)


def test_a_time_window_keeps_the_dates_inside(dated) -> None:
    window = SearchFilter.from_options(after="2017-09-20", before="20180430")
    results = dated.query_patch(0, k=20, filters=window)
    assert len(results) == 6  # 2017-09-24 (2), 2017-09-27, 2017-12-21, 2018-04-21 (2)
    assert all("2017-09-20" <= d <= "2018-04-30" for d in results["acquired"])
    inside = {i for i, d in enumerate(dated.pool.acquired) if "2017-09-20" <= d <= "2018-04-30"}
    assert set(results["patch_id"]) == inside - {0}
    only = SearchFilter.from_options(after="2018-05-02")
    assert set(dated.query_patch(0, k=5, filters=only)["acquired"]) == {"2018-05-02", "2018-05-10"}
    with pytest.raises(ConfigError) as exc:
        SearchFilter.from_options(after="2018-05-01", before="2017-01-01")
    assert "is later than --before" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        SearchFilter.from_options(after="May 2018")
    assert "is not a date" in one_line(exc)


def test_dates_on_a_pool_without_them_are_refused(pool) -> None:
    window = SearchFilter.from_options(after="2017-01-01")
    with pytest.raises(DataError) as exc:
        window.allowed(pool)  # EuroSAT: class folders, no Sentinel-2 names
    assert "records no acquisition dates" in one_line(exc)


def test_the_geopackage_holds_the_query_as_its_own_layer(index, dated, tmp_path) -> None:
    footprints = index.pool.footprints
    area = SearchFilter.from_options("103.70,17.87,103.75,17.93", after="2020-01-01")
    results = index.query_point(103.75, 17.92, k=6, filters=area)
    path = export_results(results, tmp_path / "results.gpkg")
    assert [name for name, _ in pyogrio.list_layers(path)] == ["results", "query"]
    back = gpd.read_file(path, layer="results")
    assert back["patch_id"].tolist() == results["patch_id"].tolist()
    assert set(back["acquired"]) == {"2020-02-23"}
    query = gpd.read_file(path, layer="query")
    assert query["role"].tolist() == ["query patches", "point", "within"]
    assert (query["rank"] == 0).all() and (query["results"] == 6).all()
    pid = results.attrs["query"]["patch_ids"][0]
    assert query.geometry.iloc[0].equals_exact(footprints.geometry.iloc[pid], 1e-9)
    assert query.geometry.iloc[1].equals(shapely.Point(103.75, 17.92))
    assert query.geometry.iloc[2].equals(shapely.box(103.70, 17.87, 103.75, 17.93))
    assert query["within"].iloc[0] == "103.70,17.87,103.75,17.93"
    boxed = index.query_bbox(103.74, 17.91, 103.76, 17.93, k=3)
    layer = gpd.read_file(export_results(boxed, tmp_path / "box.gpkg"), layer="query")
    assert layer["role"].tolist() == ["query patches", "box"]
    plain = gpd.read_file(export_results(results, tmp_path / "results.geojson"))
    assert len(plain) == 6  # GeoJSON holds one layer: the results only


def test_command_line_within_and_dates(dated, tmp_path) -> None:
    runner = CliRunner()
    pool = str(dated.pool.path)
    ok = runner.invoke(app, ["query", pool, "--patch", "0", "--after", "2018-05-02", "-k", "3"])
    assert ok.exit_code == 0, ok.output
    assert "acquired" in ok.output.splitlines()[0] and "2018-05-10" in ok.output
    assert "2017-06-17" not in ok.output
    bad = runner.invoke(app, ["query", pool, "--patch", "0", "--before", "soon"])
    assert isinstance(bad.exception, ConfigError)
    box = runner.invoke(app, ["query", pool, "--patch", "0", "--within", "1,2,3"])
    assert isinstance(box.exception, DataError) and "no such file" in str(box.exception)
