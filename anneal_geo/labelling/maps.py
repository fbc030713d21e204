"""Interactive maps in Jupyter, offline: query results and answered pairs over the scenes.

Built on ipyleaflet: its Leaflet JavaScript comes inside its own Jupyter extension (the
``jupyter-leaflet`` package pip installs with it), so the map needs no CDN; and the map is
made without any tile layer (ipyleaflet adds an OpenStreetMap basemap unless the layers
are given), so it asks no tile server either. What it shows instead:

- for tile pools, each scene's own RGB preview (the ``thumbnail.png`` beside the scene's
  files) as an image overlay, embedded in the notebook as a data URL;
- the pool's footprints (faint outlines; only for pools up to 5,000 patches);
- query results as blue footprints (a tooltip with rank, patch id and distance) and the
  query in red;
- answered pairs as lines between the two patches' centres: green similar, red
  dissimilar, grey skipped.

folium was not chosen because it loads Leaflet from a CDN by default (the page is blank
offline unless its JavaScript is inlined by hand), lonboard because it needs pyarrow and a
WebGL canvas for a few hundred outlines. ipyleaflet is imported when a map is drawn.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = ["answered_pairs", "footprint_map", "scene_overlays"]

#: Pools up to this size get their footprints drawn as context.
_CONTEXT_LIMIT = 5_000
_ANSWER_COLOURS = {1: "#2e9d5b", 0: "#c5403a", -1: "#9aa0a6"}
_ANSWER_NAMES = {1: "similar", 0: "dissimilar", -1: "skipped"}


def _data_url(picture: Any, quality: int = 85) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def scene_overlays(pool: PatchPool, max_size: int = 1024) -> list[dict[str, Any]]:
    """Each scene preview of a tile pool: ``{"name", "url", "bounds"}`` (bounds as
    ``((south, west), (north, east))`` in degrees). Empty for pools without previews."""
    from PIL import Image

    from anneal_geo.labelling.locator import find_preview

    footprints = pool.footprints
    if footprints is None or "source" not in footprints.columns:
        return []
    sources = footprints["source"].astype(str)
    if sources.nunique() == len(footprints):  # one file per patch: no scenes
        return []
    out = []
    for source in sorted(sources.unique()):
        preview = find_preview(source)
        bounds = _scene_bounds(source)
        if preview is None or bounds is None:
            continue
        try:
            with Image.open(preview) as image:
                image.thumbnail((max_size, max_size))
                url = _data_url(image)
        except OSError:
            continue
        west, south, east, north = bounds
        out.append(
            {"name": Path(source).parent.name, "url": url, "bounds": ((south, west), (north, east))}
        )
    return out


def _scene_bounds(source: str) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) in degrees of a scene's source raster, or None."""
    path = Path(source)
    if not path.is_file():
        return None
    try:
        import rasterio
        from rasterio.warp import transform_bounds

        with rasterio.open(path) as src:
            if src.crs is None:
                return None
            return tuple(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))
    except Exception:  # an unreadable source simply gets no overlay
        return None


def answered_pairs(store: Any) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (M, 2), answers (M,)) of a PairStore's effective answers, skips included."""
    pairs, labels, _ = store.answers(include_skipped=True)
    return pairs, labels


def _zoom(west: float, south: float, east: float, north: float) -> int:
    """The web-map zoom level that shows the box in a map about 700 px wide."""
    lat = math.radians((south + north) / 2)
    span = max(east - west, (north - south) / max(math.cos(lat), 0.05), 1e-6)
    return int(max(1, min(18, math.floor(math.log2(360.0 * 700 / 256 / span)))))


def _geojson(frame: Any, columns: list[str]) -> dict[str, Any]:
    keep = [c for c in columns if c in frame.columns]
    data: dict[str, Any] = json.loads(frame[[*keep, "geometry"]].to_json(drop_id=True))
    return data


def footprint_map(
    pool: PatchPool,
    *,
    results: Any = None,
    pairs: np.ndarray | None = None,
    answers: np.ndarray | None = None,
    scenes: bool = True,
    height: str = "460px",
) -> Any:
    """An ipyleaflet map of a pool's patches, query results and answered pairs (offline).

    Args:
        pool: the pool (georeferenced: it needs footprints).
        results: a GeoDataFrame a :class:`~anneal_geo.retrieval.geoindex.GeoIndex` query
            returned (its ``attrs["query"]`` is drawn in red).
        pairs: (M, 2) patch ids of answered pairs (e.g. from :func:`answered_pairs`).
        answers: (M,) their answers, 1 similar, 0 dissimilar, -1 skipped.
        scenes: draw tile pools' scene previews under the footprints.
        height: the map's CSS height.

    Returns:
        an ``ipyleaflet.Map`` without any tile layer (display it as a cell's last line).

    Raises:
        DataError: the pool has no footprints.
    """
    import ipyleaflet
    import ipywidgets
    import shapely

    footprints = pool.footprints
    if footprints is None:
        raise DataError("the pool has no footprints (it is not georeferenced): nothing to map")
    frame = footprints.sort_values("patch_id").reset_index(drop=True)
    layers: list[Any] = []
    boxes: list[tuple[float, float, float, float]] = []

    overlays = scene_overlays(pool) if scenes else []
    for overlay in overlays:
        layers.append(
            ipyleaflet.ImageOverlay(
                url=overlay["url"], bounds=overlay["bounds"], name=overlay["name"]
            )
        )
    if len(frame) <= _CONTEXT_LIMIT:
        layers.append(
            ipyleaflet.GeoJSON(
                data=_geojson(frame, ["patch_id"]),
                style={
                    "color": "#ffffff" if overlays else "#777777",
                    "weight": 0.5,
                    "fillOpacity": 0.0,
                    "opacity": 0.6,
                },
                name="patches",
            )
        )
    if results is not None and len(results):
        layers.append(
            ipyleaflet.GeoJSON(
                data=_geojson(results, ["rank", "patch_id", "distance"]),
                style={"color": "#1f77b4", "weight": 2, "fillOpacity": 0.35},
                hover_style={"fillOpacity": 0.7},
                name="results",
            )
        )
        boxes.append(tuple(results.total_bounds))
        query = results.attrs.get("query", {})
        ids = [int(i) for i in query.get("patch_ids", [])]
        if ids:
            chosen = frame[frame["patch_id"].isin(ids)]
            layers.append(
                ipyleaflet.GeoJSON(
                    data=_geojson(chosen, ["patch_id"]),
                    style={"color": "#d62728", "weight": 3, "fillOpacity": 0.4},
                    name="query",
                )
            )
            boxes.append(tuple(chosen.total_bounds))
        if query.get("kind") == "point" and query.get("point"):
            lon, lat = query["point"]
            layers.append(
                ipyleaflet.CircleMarker(
                    location=(lat, lon), radius=7, color="#d62728", fill_opacity=0.9, name="query"
                )
            )
        if query.get("kind") == "bbox" and query.get("bbox"):
            west, south, east, north = query["bbox"]
            layers.append(
                ipyleaflet.Rectangle(
                    bounds=((south, west), (north, east)), color="#d62728", fill_opacity=0.05
                )
            )
    if pairs is not None and len(pairs):
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        codes = np.ones(len(pairs), dtype=np.int64) if answers is None else np.asarray(answers)
        centres = shapely.centroid(np.asarray(frame.geometry.values))
        xy = np.column_stack([shapely.get_x(centres), shapely.get_y(centres)])
        for code in (-1, 0, 1):
            chosen = pairs[codes == code]
            if not len(chosen):
                continue
            lines = [
                [(float(xy[i, 1]), float(xy[i, 0])), (float(xy[j, 1]), float(xy[j, 0]))]
                for i, j in chosen.tolist()
            ]
            layers.append(
                ipyleaflet.Polyline(
                    locations=lines,
                    color=_ANSWER_COLOURS[code],
                    weight=2,
                    fill=False,
                    name=f"answered: {_ANSWER_NAMES[code]}",
                )
            )
        involved = np.unique(pairs)
        boxes.append(tuple(frame[frame["patch_id"].isin(involved)].total_bounds))
    if not boxes:
        boxes.append(tuple(frame.total_bounds))
    west = min(b[0] for b in boxes)
    south = min(b[1] for b in boxes)
    east = max(b[2] for b in boxes)
    north = max(b[3] for b in boxes)
    m = ipyleaflet.Map(
        layers=tuple(layers),
        center=((south + north) / 2, (west + east) / 2),
        zoom=_zoom(west, south, east, north),
        scroll_wheel_zoom=True,
        attribution_control=False,
        layout=ipywidgets.Layout(height=height),
    )
    m.add(ipyleaflet.LayersControl(position="topright"))
    m.add(ipyleaflet.ScaleControl(position="bottomleft", imperial=False))
    return m
