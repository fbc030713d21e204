"""Patch footprints: a GeoDataFrame with one row per patch id, saved as a GeoPackage.

Each patch keeps its source's own CRS (column ``crs``, outline as WKT in
``geometry_native``) and gets a common EPSG:4326 ``geometry`` so patches from different UTM
zones can be queried together.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.sources import GeoRef
from anneal_geo.errors import DataError

__all__ = [
    "COLUMNS",
    "LAYER",
    "PreparedFootprints",
    "build_footprints",
    "footprint_bounds",
    "footprint_ids_intersecting",
    "prepare_footprints",
    "read_footprint_rows",
    "read_footprints",
    "write_footprint_chunks",
    "write_footprints",
]

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


# Footprint layers smaller than this get no spatial index: they are read whole (see
# anneal_geo.data.pool.FOOTPRINTS_IN_MEMORY), and the R-tree is a fixed cost of every save.
SPATIAL_INDEX_MIN_ROWS = 10_000


def _write_frame(frame: Any, path: Path, append: bool = False, spatial_index: bool = True) -> None:
    """What ``pyogrio.write_dataframe(frame, path, layer=LAYER, driver="GPKG")`` writes for
    a footprints frame, through pyogrio's own column conversions (an extension array gives
    its values and its missing-value mask) less the ones footprints never need (dates with
    time zones), which cost a small pool's save about a millisecond."""
    import pyogrio.raw
    import shapely

    geometry = frame.geometry
    crs = None
    if geometry.crs is not None:
        epsg = geometry.crs.to_epsg()
        crs = f"EPSG:{epsg}" if epsg else geometry.crs.to_wkt("WKT1_GDAL")
    shapes = np.asarray(geometry.array)
    kinds = set(shapely.get_type_id(shapes).tolist())
    names = [c for c in frame.columns if c != geometry.name]
    data: list[Any] = []
    masks: list[Any] = []
    for name in names:
        column = frame[name]
        if name == "label":  # an all-None column has no type GDAL can store: text
            column = column.astype(object)
        values = column.values
        if isinstance(values, np.ndarray):
            data.append(values)
            masks.append(None)
        elif hasattr(values, "_data") and hasattr(values, "_mask"):  # nullable numbers
            data.append(values._data)
            masks.append(values._mask)
        else:  # other extension arrays (pandas' strings)
            data.append(np.asarray(values))
            masks.append(np.asarray(values.isna()))
    pyogrio.raw.write(
        path,
        shapely.to_wkb(shapes),
        data,
        names,
        masks,
        layer=LAYER,
        driver="GPKG",
        geometry_type="Polygon" if kinds == {3} else "Unknown",
        crs=crs,
        append=append,
        layer_options=None if spatial_index else {"SPATIAL_INDEX": "NO"},
    )


def write_footprints(footprints: Any, path: Path) -> None:
    """Write footprints to a GeoPackage (pyogrio), layer ``footprints``; no spatial index
    below :data:`SPATIAL_INDEX_MIN_ROWS` rows."""
    _write_frame(footprints, path, spatial_index=len(footprints) >= SPATIAL_INDEX_MIN_ROWS)


def _remove_folder(folder: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked child, whose parent still uses it
        shutil.rmtree(folder, ignore_errors=True)


class PreparedFootprints:
    """A footprints GeoPackage written ahead, beside the pixel reads, in a temporary folder
    (removed with this object, or at exit): ``PatchPool.save`` copies it rather than writing
    the same frame again, while the frame has not been handed out (see
    ``PatchPool.footprints``)."""

    def __init__(self, frame: Any) -> None:
        import tempfile
        import weakref

        folder = tempfile.mkdtemp(prefix="anneal-footprints-")
        self.path: Path | None = Path(folder) / "footprints.gpkg"
        self._cleanup = weakref.finalize(self, _remove_folder, folder, os.getpid())
        try:
            write_footprints(frame, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the file now (it no longer matches the pool's footprints)."""
        self.path = None
        self._cleanup()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # A pickled or deep-copied pool carries no file: its save() writes the footprints.
        return _no_prepared_footprints, ()


def _no_prepared_footprints() -> None:
    return None


def prepare_footprints(frame: Any) -> PreparedFootprints | None:
    """:class:`PreparedFootprints` of ``frame``, or None when they cannot be written."""
    try:
        return PreparedFootprints(frame)
    except Exception:  # no temporary folder, say: save() writes the frame itself
        return None


def write_footprint_chunks(
    chunks: Iterable[Any], path: Path, total: int, progress: bool | None = None
) -> None:
    """Write footprint frames one after the other into one GeoPackage layer, as
    :func:`write_footprints` writes their concatenation (the rows in patch-id order, so a
    row's feature id is its patch id + 1), holding one chunk at a time."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc="writing footprints",
        unit="patch",
        disable=None if progress is None else not progress,
    ) as bar:
        for k, chunk in enumerate(chunks):
            _write_frame(chunk, path, append=k > 0, spatial_index=total >= SPATIAL_INDEX_MIN_ROWS)
            bar.update(len(chunk))


def _failed(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"{path} could not be read as a footprints GeoPackage ({str(exc).splitlines()[0]}); "
        "save the pool again"
    )


def read_footprint_rows(path: Path, ids: Sequence[int] | np.ndarray) -> Any:
    """The footprints of patches ``ids`` (in that order, repeats kept) read from the
    GeoPackage by feature id, without reading the other rows: the same rows as
    ``read_footprints(path).iloc[ids]`` (index reset).

    Raises:
        DataError: the file is missing, damaged, or lacks one of the patches.
    """
    import pyogrio

    wanted = np.asarray(ids, dtype=np.int64).ravel()
    unique = np.unique(wanted)
    if unique.size == 0:  # the columns alone (max_features=0 would read every row)
        return read_footprints(path, max_features=1).iloc[:0].reset_index(drop=True)
    try:
        frame = pyogrio.read_dataframe(path, layer=LAYER, fids=unique + 1)
        by_id = np.array_equal(frame["patch_id"].to_numpy(dtype=np.int64), unique)
    except Exception:
        by_id = False  # a feature id past the end, or no patch_id column: see below
    if not by_id:
        # Feature ids not in patch order (a file written some other way): by value.
        listed = ",".join(str(int(i)) for i in unique)
        try:
            frame = pyogrio.read_dataframe(path, layer=LAYER, where=f"patch_id IN ({listed})")
        except Exception as exc:
            raise _failed(path, exc) from exc
        if "patch_id" in frame.columns:
            frame = frame.sort_values("patch_id", kind="stable").reset_index(drop=True)
    missing_columns = [c for c in COLUMNS if c not in frame.columns]
    if missing_columns:
        raise DataError(
            f"{path} lacks footprint column(s) {', '.join(missing_columns)}; save the pool again"
        )
    found = frame["patch_id"].to_numpy(dtype=np.int64)
    if not np.array_equal(found, unique):
        missing = np.setdiff1d(unique, found)
        raise DataError(
            f"{path} lacks the footprints of patch(es) {missing[:5].tolist()}; save the pool "
            "again"
        )
    order = np.searchsorted(unique, wanted)
    return frame.iloc[order].reset_index(drop=True)[list(COLUMNS)]


def footprint_ids_intersecting(path: Path, geometry: Any) -> np.ndarray:
    """Sorted patch ids whose EPSG:4326 footprint intersects ``geometry``, read through the
    GeoPackage's spatial index where it has one (only the candidate rows are read)."""
    import pyogrio
    import shapely

    try:
        frame = pyogrio.read_dataframe(
            path, layer=LAYER, columns=["patch_id"], bbox=tuple(shapely.bounds(geometry))
        )
    except Exception as exc:
        raise _failed(path, exc) from exc
    if len(frame) == 0:
        return np.zeros(0, dtype=np.int64)
    hit = shapely.intersects(frame.geometry.to_numpy(), geometry)
    return np.sort(frame["patch_id"].to_numpy(dtype=np.int64)[hit])


def footprint_bounds(path: Path) -> tuple[float, float, float, float]:
    """(west, south, east, north) of all footprints, from the GeoPackage's own extent."""
    import pyogrio

    try:
        info = pyogrio.read_info(path, layer=LAYER, force_total_bounds=True)
    except Exception as exc:
        raise _failed(path, exc) from exc
    west, south, east, north = (float(v) for v in info["total_bounds"])
    return west, south, east, north


def read_footprints(path: Path, max_features: int | None = None) -> Any:
    """Read footprints written by :func:`write_footprints`.

    Raises:
        DataError: the file is missing or not a footprints GeoPackage.
    """
    import geopandas as gpd

    try:
        frame = gpd.read_file(path, layer=LAYER, engine="pyogrio", max_features=max_features)
    except Exception as exc:
        raise _failed(path, exc) from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks footprint column(s) {', '.join(missing)}; save the pool again"
        )
    return frame[list(COLUMNS)]
