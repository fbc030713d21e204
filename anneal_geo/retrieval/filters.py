"""Search within an area and a time window, and the query as a layer of its own.

A :class:`SearchFilter` restricts the patches a query may return, **before ranking**: the
nearest neighbours are searched among the allowed patches only (a faiss ``IDSelector``;
exact search when a filtered HNSW search comes back short), so a filtered query still
returns k results whenever k patches pass the filter.

- ``within``: an area in EPSG:4326, from ``W,S,E,N`` degrees or from a vector file
  (GeoPackage, GeoJSON, Shapefile, ...) of any polygons in any CRS: the file's features
  are unioned, their edges densified and reprojected to EPSG:4326. A patch passes when its
  footprint intersects the area.
- ``after`` / ``before``: acquisition dates, both inclusive. A patch passes when its pool
  records its date (:attr:`~anneal_geo.data.pool.PatchPool.acquired`, read from Sentinel-2
  names at pool build) and the date lies in the window; patches of unknown date never
  pass a date filter.

:func:`query_layer` turns a result's query (``results.attrs["query"]``) into the rows of
the ``query`` layer that :func:`~anneal_geo.retrieval.geoindex.export_results` adds to a
GeoPackage: the query patches' outline, the point, box or image queried by, and the search
area, each with ``rank`` 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = [
    "QUERY_LAYER",
    "SearchFilter",
    "image_outline",
    "parse_date",
    "parse_within",
    "query_layer",
    "restricted_search",
]

#: Name of the GeoPackage layer that holds the query.
QUERY_LAYER = "query"
#: Segments per edge when an area is reprojected (a straight UTM edge curves in degrees).
_SEGMENTS = 16


def parse_date(text: str | date, option: str = "date") -> date:
    """An ISO date ``YYYY-MM-DD`` (or ``YYYYMMDD``) given to ``option``.

    Raises:
        ConfigError: not a date.
    """
    if isinstance(text, date):
        return text
    value = str(text).strip()
    if len(value) == 8 and value.isdigit():
        value = f"{value[:4]}-{value[4:6]}-{value[6:]}"
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a date; give YYYY-MM-DD, e.g. 2020-02-23"
        ) from None


def _reprojected(geometries: Any) -> Any:
    """The union of a GeoSeries' geometries in EPSG:4326, edges densified first."""
    import shapely

    if geometries.crs is None or geometries.crs.to_epsg() == 4326:
        return shapely.union_all(geometries.to_numpy())
    bounds = geometries.total_bounds
    edge = max(float(bounds[2] - bounds[0]), float(bounds[3] - bounds[1])) / _SEGMENTS
    dense = geometries.segmentize(edge) if edge > 0 else geometries
    return shapely.union_all(dense.to_crs("EPSG:4326").to_numpy())


def _read_area(path: Path) -> Any:
    import geopandas as gpd

    if not path.is_file():
        raise DataError(
            f"--within {path}: no such file; give W,S,E,N in degrees or a .gpkg/.geojson file"
        )
    try:
        frame = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:
        raise DataError(
            f"{path} could not be read as a vector file ({str(exc).splitlines()[0]}); give "
            "a GeoPackage or GeoJSON of polygons"
        ) from exc
    geometries = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    if not len(geometries):
        raise DataError(f"{path} holds no geometry; give a file with at least one polygon")
    if geometries.crs is None:
        if path.suffix.lower() not in (".geojson", ".json"):
            raise DataError(
                f"{path} has no CRS; save it with one (any CRS will do) or as GeoJSON "
                "in longitude/latitude"
            )
        geometries = geometries.set_crs("EPSG:4326")  # RFC 7946: GeoJSON is WGS 84
    return _reprojected(geometries)


def parse_within(value: str | Path) -> tuple[Any, str]:
    """The area ``--within`` gives, in EPSG:4326, and how it was given.

    Args:
        value: ``W,S,E,N`` in degrees, or the path of a vector file (any CRS).

    Returns:
        ``(shapely geometry, text)``.

    Raises:
        ConfigError: a malformed or empty box.
        DataError: an unreadable file, one without geometry or without a CRS.
    """
    import shapely

    text = str(value).strip()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 4 and not Path(text).exists():
        try:
            w, s, e, n = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(
                f"--within {text!r} must be W,S,E,N in degrees (e.g. 103.70,17.87,103.75,17.92) "
                "or a .gpkg/.geojson file"
            ) from None
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise ConfigError(
                f"--within box ({text}) is empty or not in degrees; give W,S,E,N with W < E "
                "and S < N"
            )
        return shapely.box(w, s, e, n), text
    return _read_area(Path(text)), text


@dataclass(frozen=True)
class SearchFilter:
    """Which patches a query may return (see the module docstring).

    Attributes:
        within: the area, a shapely geometry in EPSG:4326, or None.
        within_text: how the area was given (``W,S,E,N`` or a file name), for reports.
        after: the earliest acquisition date allowed (inclusive), or None.
        before: the latest acquisition date allowed (inclusive), or None.
    """

    within: Any = None
    within_text: str | None = None
    after: date | None = None
    before: date | None = None

    @classmethod
    def from_options(
        cls,
        within: str | Path | None = None,
        after: str | date | None = None,
        before: str | date | None = None,
    ) -> SearchFilter | None:
        """A filter from command-line style values; None when none is given.

        Raises:
            ConfigError: a malformed area or date, or ``after`` later than ``before``.
        """
        if within is None and after is None and before is None:
            return None
        area, text = parse_within(within) if within is not None else (None, None)
        start = None if after is None else parse_date(after, "--after")
        end = None if before is None else parse_date(before, "--before")
        if start is not None and end is not None and start > end:
            raise ConfigError(f"--after {start} is later than --before {end}; swap them")
        return cls(area, text, start, end)

    def allowed(self, pool: PatchPool) -> np.ndarray:
        """The sorted patch ids that pass the filter.

        Raises:
            DataError: an area on a pool without footprints, dates on a pool that records
                none, or no patch passing.
        """
        keep = np.ones(len(pool), dtype=bool)
        reasons = []
        if self.within is not None:
            if not pool.georeferenced:
                raise DataError(
                    "the pool has no footprints (no CRS in its sources), so results cannot "
                    "be restricted to an area; drop --within"
                )
            inside = np.zeros(len(pool), dtype=bool)
            inside[pool.patches_intersecting(self.within)] = True
            keep &= inside
            reasons.append(f"intersects {self.within_text or 'the area'}")
        if self.after is not None or self.before is not None:
            dates = pool.acquired
            if all(d is None for d in dates):
                raise DataError(
                    "the pool records no acquisition dates (its sources' names carry none, "
                    "e.g. S2B_MSIL2A_20200223T032739_...); drop --after/--before"
                )
            low = "0000-01-01" if self.after is None else self.after.isoformat()
            high = "9999-12-31" if self.before is None else self.before.isoformat()
            keep &= np.array([d is not None and low <= d <= high for d in dates], dtype=bool)
            reasons.append(
                "was acquired "
                + " and ".join(
                    part
                    for part in (
                        None if self.after is None else f"on or after {self.after}",
                        None if self.before is None else f"on or before {self.before}",
                    )
                    if part
                )
            )
        ids = np.flatnonzero(keep).astype(np.int64)
        if not ids.size:
            raise DataError(
                f"no patch of the pool {' and '.join(reasons)}; widen the area or the dates"
            )
        return ids

    def describe(self) -> dict[str, Any]:
        """The filter as JSON-ready values (``within``, ``within_wkt``, ``after``,
        ``before``), for the results' ``attrs`` and the query layer."""
        import shapely

        return {
            "within": self.within_text,
            "within_wkt": None
            if self.within is None
            else shapely.to_wkt(self.within, rounding_precision=-1),
            "after": None if self.after is None else self.after.isoformat(),
            "before": None if self.before is None else self.before.isoformat(),
        }


def restricted_search(
    index: Any, query: np.ndarray, want: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``want`` nearest of the ``allowed`` rows to one query, by faiss.

    Exact for a flat index (faiss skips the other rows); an HNSW search with the selector
    that comes back with fewer than ``want`` hits is redone exactly over the allowed rows.

    Returns:
        ``(squared distances, ids)``, each (want',) with want' = min(want, len(allowed)),
        by ascending distance.
    """
    import faiss as faiss_module

    faiss: Any = faiss_module  # the stubs lack the search parameter classes
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    want = min(int(want), len(allowed))
    if want < 1:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    selector = faiss.IDSelectorBatch(allowed)
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        params: Any = faiss.SearchParametersHNSW(
            sel=selector, efSearch=max(int(hnsw.efSearch), want)
        )
    else:
        params = faiss.SearchParameters(sel=selector)
    squared, ids = index.search(query, want, params=params)
    squared, ids = squared[0], ids[0].astype(np.int64)
    found = ids >= 0
    if int(found.sum()) >= want:
        return squared[found], ids[found]
    # A sparse filter can cut an HNSW graph into pieces: search the allowed rows exactly.
    best_d = np.zeros(0, dtype=np.float32)
    best_i = np.zeros(0, dtype=np.int64)
    for start in range(0, len(allowed), 65536):
        chunk = allowed[start : start + 65536]
        vectors = np.asarray(index.reconstruct_batch(chunk), dtype=np.float32)
        d = ((vectors - query[0][None]) ** 2).sum(axis=1).astype(np.float32)
        best_d = np.concatenate([best_d, d])
        best_i = np.concatenate([best_i, chunk])
        if len(best_d) > want:
            keep = np.argpartition(best_d, want - 1)[:want]
            best_d, best_i = best_d[keep], best_i[keep]
    order = np.lexsort((best_i, best_d))
    return best_d[order], best_i[order]


def image_outline(path: str | Path) -> str | None:
    """The EPSG:4326 outline (WKT) of a georeferenced image, None without a CRS."""
    import warnings

    import rasterio
    import shapely
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.crs is None:
                    return None
                crs, bounds = src.crs.to_string(), src.bounds
    except RasterioError:
        return None
    import geopandas as gpd

    box = gpd.GeoSeries([shapely.box(*bounds)], crs=crs)
    return str(shapely.to_wkt(_reprojected(box), rounding_precision=-1))


def query_layer(results: Any) -> Any:
    """The ``query`` layer of a result (rank 0 rows), or None when nothing is known.

    Rows, each with ``rank`` 0, ``role``, the query's ``kind``, ``query`` (its patch ids or
    image), the number of ``results``, ``within``, ``after`` and ``before``:

    - ``query patches``: the outline of the patch(es) the query embedding came from;
    - ``point`` / ``box`` / ``image``: what was queried by;
    - ``within``: the search area.
    """
    import geopandas as gpd
    import shapely

    query = dict(results.attrs.get("query", {}))
    filters = dict(query.get("filters") or {})
    rows: list[tuple[str, Any]] = []
    if query.get("area_wkt"):
        rows.append(("query patches", shapely.from_wkt(query["area_wkt"])))
    if query.get("kind") == "point" and query.get("point"):
        rows.append(("point", shapely.Point(*query["point"])))
    if query.get("kind") == "bbox" and query.get("bbox"):
        rows.append(("box", shapely.box(*query["bbox"])))
    if query.get("kind") == "image" and query.get("image_wkt"):
        rows.append(("image", shapely.from_wkt(query["image_wkt"])))
    if filters.get("within_wkt"):
        rows.append(("within", shapely.from_wkt(filters["within_wkt"])))
    if not rows:
        return None
    ids = query.get("patch_ids") or []
    described = query.get("image") or ", ".join(str(i) for i in ids[:50])
    if len(ids) > 50:
        described += f", ... ({len(ids)} patches)"
    frame = {
        "rank": np.zeros(len(rows), dtype=np.int64),
        "role": [role for role, _ in rows],
        "kind": [str(query.get("kind", ""))] * len(rows),
        "query": [described] * len(rows),
        "results": np.full(len(rows), len(results), dtype=np.int64),
        "within": [filters.get("within")] * len(rows),
        "after": [filters.get("after")] * len(rows),
        "before": [filters.get("before")] * len(rows),
        # How many nearest patches the query was averaged with before ranking (0 = none).
        "query_expansion": np.full(len(rows), int(query.get("query_expansion", 0)), np.int64),
    }
    layer = gpd.GeoDataFrame(frame, geometry=[g for _, g in rows], crs="EPSG:4326")
    for column in ("within", "after", "before"):
        layer[column] = layer[column].astype(object)
    return layer
