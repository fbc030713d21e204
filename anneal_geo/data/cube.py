"""xarray in and out: cut a (band, y, x) or (time, band, y, x) cube into a pool, and hand a
pool back as a (patch, band, y, x) ``DataArray`` with band names and footprint coordinates.

A cube is cut on the same whole-patch grid as a tile archive
(:func:`anneal_geo.data.tiles.patch_grid`: centred, no padded patch), each time step on its
own, and mostly-nodata patches are skipped by the same rule. Its CRS comes from a
rioxarray/CF ``spatial_ref`` coordinate (attribute ``crs_wkt`` or ``spatial_ref``) or from
the array's ``crs`` attribute; its grid from ``spatial_ref``'s ``GeoTransform`` or from
regularly spaced ``x``/``y`` pixel-centre coordinates.

:func:`pool_to_xarray` and :func:`pool_from_xarray` (:func:`pool_arrays_from_xarray` gives
the constructor arguments) round-trip a pool exactly: patches, band names, labels, sources,
pixel windows and footprints.

This module depends on :mod:`anneal_geo.data.pool` (it builds pools through the public
:class:`~anneal_geo.data.pool.PatchPool` constructor), not the other way round: the pool module
never imports this one. Both functions are also exported from :mod:`anneal_geo.data`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from anneal_geo.data.bands import infer_band_names
from anneal_geo.data.pool import PatchPool
from anneal_geo.data.sources import GeoRef
from anneal_geo.data.tiles import DEFAULT_MAX_NODATA, DEFAULT_PATCH_SIZE, IngestReport, patch_grid
from anneal_geo.errors import ConfigError, DataError

__all__ = [
    "cube_crs",
    "cube_transform",
    "pool_arrays_from_xarray",
    "pool_from_xarray",
    "pool_to_xarray",
]

_CRS_ATTRS = ("crs_wkt", "spatial_ref", "crs")


def _crs_text(value: Any, where: str) -> str:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        crs = CRS.from_user_input(value)
    except CRSError as exc:
        raise DataError(f"{where} holds a CRS pyproj cannot read ({exc}); fix it") from exc
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


def cube_crs(data: Any) -> str:
    """The cube's CRS as ``"EPSG:<code>"`` (or WKT).

    Raises:
        DataError: neither a ``spatial_ref`` coordinate nor a ``crs`` attribute holds one.
    """
    holders = [data.coords[name] for name in data.coords if name == "spatial_ref"]
    holders += [data.coords[name] for name in data.coords if name != "spatial_ref"]
    for coord in holders:
        for attr in _CRS_ATTRS:
            if coord.attrs.get(attr):
                return _crs_text(coord.attrs[attr], f"coordinate {coord.name!r}")
    for attr in _CRS_ATTRS:
        if data.attrs.get(attr):
            return _crs_text(data.attrs[attr], f"attribute {attr!r}")
    raise DataError(
        f"the DataArray {data.name or ''} has no CRS (no spatial_ref coordinate with crs_wkt, "
        "no crs attribute); set one, e.g. da.attrs['crs'] = 'EPSG:32633' or da.rio.write_crs()"
    )


def _regular(values: np.ndarray, name: str) -> float:
    if values.size < 2:
        raise DataError(
            f"coordinate {name!r} has {values.size} value(s); need a regular grid of at least "
            "2 pixel centres, or a GeoTransform on spatial_ref"
        )
    steps = np.diff(values.astype(np.float64))
    step = float(steps.mean())
    if step == 0 or not np.allclose(steps, step, rtol=1e-6, atol=1e-9 * abs(step)):
        raise DataError(
            f"coordinate {name!r} is not regularly spaced; resample the cube to a regular grid"
        )
    return step


def cube_transform(data: Any) -> tuple[float, float, float, float, float, float]:
    """The GDAL affine ``(a, b, c, d, e, f)`` of the cube's (y, x) pixel grid as stored.

    From ``spatial_ref.attrs["GeoTransform"]`` when present, else from the ``x`` and ``y``
    pixel-centre coordinates.
    """
    if "spatial_ref" in data.coords and "GeoTransform" in data.coords["spatial_ref"].attrs:
        parts = [float(v) for v in str(data.coords["spatial_ref"].attrs["GeoTransform"]).split()]
        if len(parts) != 6:
            raise DataError("spatial_ref's GeoTransform must hold 6 numbers; fix it")
        c, a, b, f, d, e = parts
        return (a, b, c, d, e, f)
    if "x" not in data.coords or "y" not in data.coords:
        raise DataError(
            "the cube has no x/y coordinates and no GeoTransform; add pixel-centre x and y "
            "coordinates"
        )
    x = np.asarray(data.coords["x"].values, dtype=np.float64)
    y = np.asarray(data.coords["y"].values, dtype=np.float64)
    dx, dy = _regular(x, "x"), _regular(y, "y")
    return (dx, 0.0, float(x[0] - dx / 2), 0.0, dy, float(y[0] - dy / 2))


def _band_names(data: Any, band_dim: str, bands: Sequence[str] | None) -> list[str]:
    count = data.sizes[band_dim]
    if bands is not None:
        from anneal_geo.data.bands import check_band_names

        return check_band_names(bands, count, f"dimension {band_dim!r}")
    if band_dim in data.coords:
        values = [v.item() if hasattr(v, "item") else v for v in data.coords[band_dim].values]
        if all(isinstance(v, str) for v in values):
            return [str(v) for v in values]
    described = data.attrs.get("long_name")
    descriptions = list(described) if isinstance(described, (list, tuple)) else [None] * count
    return infer_band_names(
        count, descriptions, rgb_image=False, where=f"the cube's {band_dim!r} dimension"
    )


def _time_text(value: Any) -> str:
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s"))
    return str(value)


def _nodata(data: Any) -> float | None:
    for holder in (data.attrs, data.encoding):
        for key in ("_FillValue", "nodata", "nodatavals"):
            value = holder.get(key)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return float(value)
    return None


def _from_patch_array(data: Any) -> dict[str, Any]:
    """Constructor arguments from the (patch, band, y, x) array of :func:`pool_to_xarray`."""
    data = data.transpose("patch", "band", "y", "x")
    patches = np.asarray(data.values)
    n, _, height, width = patches.shape
    coords = data.coords
    kwargs: dict[str, Any] = {
        "patches": patches,
        "bands": [str(b) for b in coords["band"].values],
        "multilabel": bool(data.attrs.get("multilabel", 0)),
    }
    if "source" in coords:
        kwargs["sources"] = [str(s) for s in coords["source"].values]
    if "label" in coords and "class_names" in data.attrs:
        names = [str(c) for c in data.attrs["class_names"]]
        column = {name: j for j, name in enumerate(names)}
        labels = np.zeros((n, len(names)), dtype=bool)
        for i, text in enumerate(coords["label"].values.tolist()):
            for name in str(text or "").split("; ") if text else []:
                if name not in column:
                    raise DataError(
                        f"patch {i} has label {name!r}, which is not in the class_names "
                        "attribute; fix the label coordinate"
                    )
                labels[i, column[name]] = True
        kwargs["labels"] = labels
        kwargs["class_names"] = names
    if "resolution" in data.attrs:
        kwargs["resolution"] = float(data.attrs["resolution"])
    for key in ("band_mean", "band_std"):
        if key in data.attrs:
            kwargs[key] = np.asarray(data.attrs[key], dtype=np.float64)
    if "crs" in coords and "x_native" in coords and "y_native" in coords:
        crs = [str(c) for c in coords["crs"].values]
        xs = np.asarray(coords["x_native"].values, dtype=np.float64)
        ys = np.asarray(coords["y_native"].values, dtype=np.float64)
        if all(crs):
            dx = (xs[:, -1] - xs[:, 0]) / max(width - 1, 1)
            dy = (ys[:, -1] - ys[:, 0]) / max(height - 1, 1)
            georefs = [
                GeoRef(
                    crs[i],
                    (
                        float(dx[i]),
                        0.0,
                        float(xs[i, 0] - dx[i] / 2),
                        0.0,
                        float(dy[i]),
                        float(ys[i, 0] - dy[i] / 2),
                    ),
                    height,
                    width,
                )
                for i in range(n)
            ]
            windows = np.stack(
                [np.asarray(coords[k].values, dtype=np.int64) for k in ("row_off", "col_off")],
                axis=1,
            )
            kwargs["source_crs"] = crs
            kwargs["footprints"] = _footprint_builder(
                georefs,
                kwargs.get("sources", [f"array:{i}" for i in range(n)]),
                windows,
                kwargs.get("labels"),
                kwargs.get("class_names"),
            )
    return kwargs


def _footprint_builder(
    georefs: list[GeoRef],
    sources: Sequence[str],
    windows: np.ndarray,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> Callable[[], Any]:
    def build() -> Any:
        from anneal_geo.data.footprints import build_footprints

        text: list[str | None] = [None] * len(georefs)
        if labels is not None and class_names is not None:
            text = ["; ".join(class_names[int(j)] for j in np.flatnonzero(row)) for row in labels]
        frame = build_footprints(georefs, list(sources), text)
        if frame is not None:
            frame["row_off"] = windows[:, 0]
            frame["col_off"] = windows[:, 1]
        return frame

    return build


def pool_arrays_from_xarray(
    data: Any,
    patch_size: int | None = None,
    *,
    stride: int | None = None,
    band_dim: str = "band",
    bands: Sequence[str] | None = None,
    max_nodata: float = DEFAULT_MAX_NODATA,
    source: str | None = None,
    on_report: Callable[[IngestReport], None] | None = None,
) -> dict[str, Any]:
    """The :class:`~anneal_geo.data.pool.PatchPool` constructor arguments for a DataArray.

    Args:
        data: an ``xarray.DataArray``: a (band, y, x) or (time, band, y, x) cube with a
            CRS (any dimension order; dask-backed arrays are computed), or the
            (patch, band, y, x) array of :func:`pool_to_xarray`.
        patch_size: patch side in pixels for a cube (default 64); ignored for a patch array.
        stride: pixels between patches (default ``patch_size``).
        band_dim: the name of the band dimension of a cube.
        bands: band names in the cube's band order, when its band coordinate holds none.
        max_nodata: skip a patch when more than this share of its pixels is nodata (a band
            NaN, or every band equal to the ``_FillValue``/``nodata`` attribute).
        source: the name recorded as each patch's source (default: the array's name or
            ``"xarray"``), with ``[time=...]`` appended per time step.
        on_report: called with an :class:`~anneal_geo.data.tiles.IngestReport`.

    Raises:
        DataError: not a DataArray, unexpected dimensions, no CRS, an irregular grid, or a
            patch larger than the cube.
    """
    import time as _time

    import xarray as xr

    t0 = _time.perf_counter()
    if not isinstance(data, xr.DataArray):
        raise DataError(
            f"from_xarray takes an xarray.DataArray, got {type(data).__name__}; for a Dataset "
            "pick one variable or use ds.to_array('band')"
        )
    if "patch" in data.dims:
        if set(data.dims) != {"patch", "band", "y", "x"}:
            raise DataError(
                f"a patch array must have dimensions (patch, band, y, x), got {data.dims}"
            )
        return _from_patch_array(data)
    expected = {band_dim, "y", "x"}
    extra = set(data.dims) - expected - {"time"}
    if not expected <= set(data.dims) or extra:
        raise DataError(
            f"the cube has dimensions {data.dims}; expected ({band_dim}, y, x) or "
            f"(time, {band_dim}, y, x); rename or select dimensions (band_dim= names the band "
            "dimension)"
        )
    size = DEFAULT_PATCH_SIZE if patch_size is None else int(patch_size)
    step = size if stride is None else int(stride)
    if size < 1 or step < 1:
        raise ConfigError(f"patch_size={size} and stride={step} must be positive")
    if not 0.0 <= max_nodata <= 1.0:
        raise ConfigError(f"max_nodata={max_nodata!r} must lie in [0, 1] (a share of pixels)")
    crs = cube_crs(data)
    a, b, c, d, e, f = cube_transform(data)
    if b != 0 or d != 0:
        raise DataError("the cube's grid is rotated; warp it to a north-up grid first")
    # Store north-up, west-to-east: flip axes stored the other way round.
    if e > 0:
        data = data.isel(y=slice(None, None, -1))
        f, e = f + e * data.sizes["y"], -e
    if a < 0:
        data = data.isel(x=slice(None, None, -1))
        c, a = c + a * data.sizes["x"], -a
    names = _band_names(data, band_dim, bands)
    has_time = "time" in data.dims
    data = data.transpose(*(("time",) if has_time else ()), band_dim, "y", "x")
    height, width = data.sizes["y"], data.sizes["x"]
    try:
        rows, cols, row0, col0 = patch_grid(height, width, size, step)
    except DataError:
        raise DataError(
            f"patch size {size} px is larger than the cube ({width}x{height} px); use a "
            "smaller patch_size"
        ) from None
    nodata = _nodata(data)
    name = source or (str(data.name) if data.name is not None else "xarray")
    times = list(data.coords["time"].values) if has_time else [None]
    row_idx = row0 + step * np.arange(rows)
    col_idx = col0 + step * np.arange(cols)
    r_grid, c_grid = np.meshgrid(row_idx, col_idx, indexing="ij")
    r_flat, c_flat = r_grid.ravel(), c_grid.ravel()
    kept_patches, sources, georefs, windows = [], [], [], []
    report = IngestReport(scenes=len(times), windows=len(times) * rows * cols)
    report.max_nodata = float(max_nodata)
    for t, when in enumerate(times):
        cube = np.asarray((data.isel(time=t) if has_time else data).values)
        view = np.lib.stride_tricks.sliding_window_view(cube, (size, size), axis=(1, 2))
        patches = view[:, r_flat, c_flat].transpose(1, 0, 2, 3)  # (n, C, P, P)
        bad = np.zeros((patches.shape[0], size, size), dtype=bool)
        if nodata is not None:
            bad |= (patches == nodata).all(axis=1)
        if patches.dtype.kind == "f":
            bad |= np.isnan(patches).any(axis=1)
        keep = bad.mean(axis=(1, 2)) <= max_nodata
        report.skipped_nodata += int((~keep).sum())
        kept_patches.append(patches[keep])
        label = name if when is None else f"{name}[time={_time_text(when)}]"
        for r, col in zip(r_flat[keep].tolist(), c_flat[keep].tolist(), strict=True):
            sources.append(label)
            georefs.append(GeoRef(crs, (a, 0.0, c + col * a, 0.0, e, f + r * e), size, size))
            windows.append((r, col))
    all_patches = np.concatenate(kept_patches) if kept_patches else np.zeros(0)
    if all_patches.shape[0] == 0:
        raise DataError(
            f"all {report.windows} patches of the cube are more than {max_nodata:.0%} nodata; "
            "raise max_nodata"
        )
    report.kept = int(all_patches.shape[0])
    report.crs_patches = dict(Counter([crs] * report.kept))
    report.seconds = _time.perf_counter() - t0
    if on_report is not None:
        on_report(report)
    window_arr = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
    return {
        "patches": np.ascontiguousarray(all_patches),
        "bands": names,
        "sources": sources,
        "source_crs": [crs] * report.kept,
        "footprints": _footprint_builder(georefs, sources, window_arr),
        "resolution": float(a),
    }


def pool_from_xarray(data: Any, patch_size: int | None = None, **options: Any) -> PatchPool:
    """A :class:`~anneal_geo.data.pool.PatchPool` from an xarray ``DataArray``: a (band, y, x)
    or (time, band, y, x) cube cut into patches, or the (patch, band, y, x) array of
    :func:`pool_to_xarray`; the options are those of :func:`pool_arrays_from_xarray`."""
    return PatchPool(**pool_arrays_from_xarray(data, patch_size, **options))


def pool_to_xarray(pool: PatchPool) -> Any:
    """The pool as a ``DataArray`` named ``patches`` with dimensions (patch, band, y, x).

    Coordinates: ``patch`` (the patch ids), ``band`` (names), ``y``/``x`` (pixel index in
    the patch); per patch ``source``, and, when georeferenced, ``crs``, ``row_off``,
    ``col_off``, ``lon``/``lat`` (footprint centroid, EPSG:4326) and ``x_native``
    (patch, x) / ``y_native`` (patch, y), the pixel-centre coordinates in the patch's own
    CRS; ``label`` (patch) text when labelled (``"; "``-joined when multi-label). Attributes:
    ``resolution``, ``band_mean``, ``band_std``, ``multilabel``, ``fingerprint``, and
    ``class_names`` when labelled. The
    patches are not copied (a memory-mapped pool stays on disk).
    """
    import xarray as xr

    n = len(pool)
    height, width = pool.patch_size
    coords: dict[str, Any] = {
        "patch": np.arange(n, dtype=np.int64),
        "band": list(pool.bands),
        "y": np.arange(height, dtype=np.int64),
        "x": np.arange(width, dtype=np.int64),
        "source": ("patch", np.asarray(pool.sources, dtype=object)),
    }
    footprints = pool.footprints
    if footprints is not None:
        import shapely

        native = shapely.from_wkt(footprints["geometry_native"].to_numpy())
        bounds = shapely.bounds(native)  # (n, 4) minx, miny, maxx, maxy
        dx = (bounds[:, 2] - bounds[:, 0]) / width
        dy = (bounds[:, 3] - bounds[:, 1]) / height
        centre = shapely.centroid(footprints.geometry.to_numpy())
        coords.update(
            {
                "crs": ("patch", footprints["crs"].to_numpy(dtype=object)),
                "row_off": ("patch", footprints["row_off"].to_numpy(dtype=np.int64)),
                "col_off": ("patch", footprints["col_off"].to_numpy(dtype=np.int64)),
                "lon": ("patch", shapely.get_x(centre)),
                "lat": ("patch", shapely.get_y(centre)),
                "x_native": (
                    ("patch", "x"),
                    bounds[:, 0:1] + (np.arange(width) + 0.5)[None, :] * dx[:, None],
                ),
                "y_native": (
                    ("patch", "y"),
                    bounds[:, 3:4] - (np.arange(height) + 0.5)[None, :] * dy[:, None],
                ),
            }
        )
    if pool.labels is not None and pool.class_names is not None:
        coords["label"] = ("patch", np.asarray([pool.label_text(i) for i in range(n)], object))
    attrs: dict[str, Any] = {
        "band_mean": pool.band_mean.tolist(),
        "band_std": pool.band_std.tolist(),
        "multilabel": int(pool.multilabel),
        "fingerprint": pool.fingerprint,
    }
    if pool.resolution is not None:
        attrs["resolution"] = pool.resolution
    if pool.class_names is not None:
        attrs["class_names"] = list(pool.class_names)
    return xr.DataArray(
        pool.patches,
        dims=("patch", "band", "y", "x"),
        coords=coords,
        name="patches",
        attrs=attrs,
    )
