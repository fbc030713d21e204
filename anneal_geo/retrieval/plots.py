"""Static pictures of query results: ``anneal-geo query --plot`` and :func:`plot_results`.

The patches are drawn by the labeller's renderer
(:class:`~anneal_geo.annotators.render.PatchRenderer`) with its pool-wide stretch, so the
query and its results can be compared by colour (a per-patch stretch, ``stretch="patch"``,
only on request). The map below them is zoomed to the results and the query, not to the
whole pool: the footprints of the pool's other patches in that window are drawn faintly,
the results in blue numbered by rank, and the query in red (its patches, its point, its box
or the outline of its image).

matplotlib is imported when a picture is drawn, never with this module.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["map_extent", "plot_results"]

#: Footprints drawn behind the results at most (the pool's patches inside the map window).
_MAX_CONTEXT_FOOTPRINTS = 20_000


def map_extent(
    bounds: list[tuple[float, float, float, float]], margin: float = 0.15
) -> tuple[float, float, float, float]:
    """(west, south, east, north) around every box of ``bounds``, with a margin.

    The margin is a share of the larger side, and at least about 300 m, so one small patch
    is still shown with its surroundings.
    """
    boxes = np.asarray([b for b in bounds if np.isfinite(b).all()], dtype=np.float64)
    if not len(boxes):
        raise ValueError("no finite bounds to frame")
    west, south = boxes[:, 0].min(), boxes[:, 1].min()
    east, north = boxes[:, 2].max(), boxes[:, 3].max()
    pad = max(margin * max(east - west, north - south), 0.003)
    return west - pad, south - pad, east + pad, north + pad


def _query_shapes(query: dict[str, Any], footprints: Any) -> list[Any]:
    """Shapely geometries (EPSG:4326) of the query: its patches, box or image outline."""
    import shapely

    shapes: list[Any] = []
    ids = [int(i) for i in query.get("patch_ids", [])]
    if ids and footprints is not None:
        frame = footprints.set_index("patch_id")
        shapes.extend(frame.loc[[i for i in ids if i in frame.index]].geometry.tolist())
    if query.get("kind") == "bbox" and query.get("bbox"):
        shapes.append(shapely.box(*query["bbox"]))
    if query.get("kind") == "image" and query.get("image_wkt"):
        with contextlib.suppress(shapely.errors.ShapelyError):
            shapes.append(shapely.from_wkt(query["image_wkt"]))
    if query.get("kind") == "point" and query.get("point"):
        shapes.append(shapely.Point(*query["point"]))
    return shapes


def plot_results(
    index: Any,
    results: Any,
    path: str | Path,
    n: int = 8,
    *,
    bands: str | None = None,
    stretch: Literal["pool", "patch"] = "pool",
) -> Path:
    """Save a quick look: the query and its best ``n`` results, and a map of where they are.

    Args:
        index: the :class:`~anneal_geo.retrieval.geoindex.GeoIndex` the results came from.
        results: what one of its queries returned.
        path: the PNG to write.
        n: results shown as pictures (the map shows all of them).
        bands: picture bands (preset ``true``/``false`` or three names; default true colour).
        stretch: ``"pool"`` (one stretch for the whole pool: colours comparable) or
            ``"patch"`` (each patch on its own).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anneal_geo.annotators.render import PatchRenderer

    pool = index.pool
    renderer = PatchRenderer(pool, bands, stretch=stretch)
    query = results.attrs.get("query", {})
    shown = results.head(n)
    panels = 1 + len(shown)
    fig = plt.figure(figsize=(1.9 * max(panels, 4), 6.6), layout="constrained")
    grid = fig.add_gridspec(2, panels, height_ratios=[1, 1.8])
    ax = fig.add_subplot(grid[0, 0])
    query_ids = [int(i) for i in query.get("patch_ids", [])]
    if query.get("kind") == "image":
        names = list(index.meta["embedder"].get("bands", pool.bands))
        ax.imshow(renderer.composite_array(index.image_patches(query["image"])[0], names))
        ax.set_title("query image", fontsize=8, color="tab:red")
    elif query_ids:
        ax.imshow(renderer.composite(query_ids[0]))
        extra = f" (+{len(query_ids) - 1})" if len(query_ids) > 1 else ""
        ax.set_title(f"query #{query_ids[0]}{extra}", fontsize=8, color="tab:red")
    elif query.get("kind") == "point":
        ax.text(0.5, 0.5, "query: a point", ha="center", va="center", fontsize=8)
    ax.axis("off")
    for j, row in enumerate(shown.itertuples(index=False)):
        ax = fig.add_subplot(grid[0, 1 + j])
        ax.imshow(renderer.composite(int(row.patch_id)))
        ax.set_title(f"{row.rank}. #{row.patch_id}\nd={row.distance:.3g}", fontsize=8)
        ax.axis("off")

    ax = fig.add_subplot(grid[1, :])
    footprints = pool.footprints
    if footprints is not None and not results.geometry.isna().all():
        _draw_map(ax, footprints, results, query)
    else:
        ax.text(0.5, 0.5, "no footprints (pool not georeferenced)", ha="center")
        ax.axis("off")
    stretch_note = "pool-wide stretch" if stretch == "pool" else "per-patch stretch"
    fig.suptitle(
        f"{', '.join(renderer.band_names)} · {stretch_note}", fontsize=8, x=0.99, ha="right"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_map(ax: Any, footprints: Any, results: Any, query: dict[str, Any]) -> None:
    """Results (blue, by rank) and the query (red) on the pool's footprints, zoomed in."""
    import geopandas as gpd

    shapes = _query_shapes(query, footprints)
    boxes = [tuple(results.total_bounds)] + [tuple(s.bounds) for s in shapes]
    west, south, east, north = map_extent(boxes)
    context = footprints.cx[west:east, south:north]
    if len(context) <= _MAX_CONTEXT_FOOTPRINTS:
        context.plot(ax=ax, facecolor="none", edgecolor="0.8", linewidth=0.4)
    results.plot(ax=ax, facecolor="tab:blue", edgecolor="tab:blue", alpha=0.5)
    for row in results.itertuples(index=False):
        c = row.geometry.centroid
        ax.annotate(str(row.rank), (c.x, c.y), fontsize=7, ha="center", va="center")
    polygons = [s for s in shapes if s.geom_type != "Point"]
    if polygons:
        gpd.GeoSeries(polygons, crs=footprints.crs).plot(
            ax=ax, facecolor="tab:red", edgecolor="tab:red", alpha=0.35, linewidth=1.5
        )
    for s in shapes:
        if s.geom_type == "Point":
            ax.plot(s.x, s.y, marker="x", color="tab:red", markersize=9, mew=2)
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    # Degrees of longitude shrink with latitude: keep the map's shapes true.
    lat = (south + north) / 2
    ax.set_aspect(1.0 / max(math.cos(math.radians(lat)), 0.05))
    ax.set_title("where: query (red) and results (blue, by rank)", fontsize=9)
