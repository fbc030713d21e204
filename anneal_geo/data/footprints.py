"""Patch footprints: a GeoDataFrame with one row per patch id, saved as a GeoPackage.

Each patch keeps its source's own CRS (column ``crs``, outline as WKT in
``geometry_native``) and gets a common EPSG:4326 ``geometry`` so patches from different UTM
zones can be queried together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.sources import GeoRef
from anneal_geo.errors import DataError

__all__ = ["COLUMNS", "LAYER", "build_footprints", "read_footprints", "write_footprints"]

#: Footprint columns, in order (``geometry`` is the EPSG:4326 outline).
COLUMNS = (
    "patch_id", "source", "crs", "row_off", "col_off", "height", "width", "label",
    "geometry_native", "geometry",
)  # fmt: skip
LAYER = "footprints"

# Edges are densified before reprojection so a large patch's outline stays faithful
# (a straight UTM edge is curved in lon/lat); a 64 px patch barely changes.
_SEGMENTS_PER_EDGE = 8


def build_footprints(
    georefs: Sequence[GeoRef | None],
    sources: Sequence[str],
    labels: Sequence[str | None],
) -> Any:
    """The footprints GeoDataFrame, or None when any patch lacks a georeference.

    Args:
        georefs: per patch, its georeference (None when the source has no CRS).
        sources: per patch, its source path.
        labels: per patch, its label text (class name, ``"; "``-joined for multi-label) or None.

    Returns:
        a ``geopandas.GeoDataFrame`` with :data:`COLUMNS`, CRS EPSG:4326, or None.
    """
    if not georefs or any(g is None for g in georefs):
        return None
    import geopandas as gpd
    import shapely

    refs = [g for g in georefs if g is not None]
    rings = np.stack([g.corners() for g in refs])  # (N, 5, 2)
    native = shapely.polygons(rings)
    crs = np.array([g.crs for g in refs], dtype=object)
    edge = np.array([max(g.width * g.resolution[0], g.height * g.resolution[1]) for g in refs])
    dense = shapely.segmentize(native, edge / _SEGMENTS_PER_EDGE)
    geographic = np.empty(len(refs), dtype=object)
    # One vectorised transform per CRS (EuroSAT spans eight UTM zones).
    for code in sorted(set(crs)):
        mask = crs == code
        series = gpd.GeoSeries(dense[mask], crs=code).to_crs("EPSG:4326")
        geographic[mask] = series.to_numpy()
    frame = {
        "patch_id": np.arange(len(refs), dtype=np.int64),
        "source": list(sources),
        "crs": list(crs),
        "row_off": np.zeros(len(refs), dtype=np.int64),
        "col_off": np.zeros(len(refs), dtype=np.int64),
        "height": np.array([g.height for g in refs], dtype=np.int64),
        "width": np.array([g.width for g in refs], dtype=np.int64),
        "label": list(labels),
        "geometry_native": shapely.to_wkt(native, rounding_precision=-1),
    }
    return gpd.GeoDataFrame(frame, geometry=list(geographic), crs="EPSG:4326")


def write_footprints(footprints: Any, path: Path) -> None:
    """Write footprints to a GeoPackage (pyogrio engine), layer ``footprints``."""
    # An all-None label column has no type GDAL can store; write it as text.
    frame = footprints.copy()
    frame["label"] = frame["label"].astype(object)
    frame.to_file(path, layer=LAYER, driver="GPKG", engine="pyogrio")


def read_footprints(path: Path) -> Any:
    """Read footprints written by :func:`write_footprints`.

    Raises:
        DataError: the file is missing or not a footprints GeoPackage.
    """
    import geopandas as gpd

    try:
        frame = gpd.read_file(path, layer=LAYER, engine="pyogrio")
    except Exception as exc:
        raise DataError(
            f"{path} could not be read as a footprints GeoPackage ({str(exc).splitlines()[0]}); "
            "save the pool again"
        ) from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks footprint column(s) {', '.join(missing)}; save the pool again"
        )
    return frame[list(COLUMNS)]
