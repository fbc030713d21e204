"""`anneal-geo index` and `anneal-geo query`: a retrieval index queried by patch, place, box
or image (heavy imports stay inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from anneal_geo.cli._common import numbers
from anneal_geo.errors import ConfigError

__all__ = ["app"]

app = typer.Typer()


@app.command("index")
def index(
    source: Path = typer.Argument(..., help="A session directory or a pool directory."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for index.faiss/index.json (default: SOURCE)."
    ),
    kind: str = typer.Option(
        "auto", help="auto (exact below 200,000 patches, else HNSW), flat or hnsw."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Embed the pool with an exported model (anneal-geo export)."
    ),
) -> None:
    """Build a faiss retrieval index over a session's embeddings, over standardised
    spectral features of a bare pool, or over a pool embedded by an exported model (--model);
    faiss row = pool patch id."""
    import time

    from anneal_geo.retrieval.geoindex import build_index

    t0 = time.perf_counter()
    built = build_index(source, out, kind=kind, model=model)
    embedder = built.meta["embedder"]
    if embedder["kind"] == "session":
        what = f"session embeddings (round {embedder.get('round')})"
    elif embedder["kind"] == "model":
        what = f"embeddings of the model {model}"
    else:
        what = "standardised spectral features"
    typer.echo(
        f"indexed {len(built)} patches ({built.meta['dim']}-d {what}, {built.kind}) in "
        f"{time.perf_counter() - t0:.1f} s -> {built.path}"
    )


def _show(results: Any) -> None:
    expansion = int(results.attrs.get("query", {}).get("query_expansion", 0))
    if expansion:
        typer.echo(
            f"ranked by the query averaged with its {expansion} nearest patches (query "
            "expansion; --query-expansion 0 ranks by the query alone)"
        )
    header = f"{'rank':>4}  {'distance':>9}  {'patch':>6}  {'window (row, col, h, w)':<24}  "
    header += f"{'lon':>9}  {'lat':>8}  {'acquired':<10}  label"
    typer.echo(header)
    for row in results.itertuples(index=False):
        window = f"{row.row_off}, {row.col_off}, {row.height}, {row.width}"
        if row.geometry is not None:
            c = row.geometry.centroid
            where = f"{c.x:>9.4f}  {c.y:>8.4f}"
        else:
            where = f"{'-':>9}  {'-':>8}"
        typer.echo(
            f"{row.rank:>4}  {row.distance:>9.4f}  {row.patch_id:>6}  {window:<24}  {where}  "
            f"{row.acquired or '-':<10}  {row.label or ''}".rstrip()
        )


@app.command("query")
def query(
    index_path: Path = typer.Argument(
        ..., metavar="INDEX", help="Folder with index.json (a session or pool), or the file."
    ),
    patch: int | None = typer.Option(None, "--patch", help="Query by pool patch id."),
    point: str | None = typer.Option(
        None, "--point", help="Query by the patch containing LON,LAT (degrees)."
    ),
    bbox: str | None = typer.Option(
        None, "--bbox", help="Query by the mean of the patches in W,S,E,N (degrees)."
    ),
    image: Path | None = typer.Option(
        None, "--image", help="Query by an image file with the pool's bands."
    ),
    k: int = typer.Option(20, "-k", help="Number of results."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the results as .gpkg (GeoPackage) or .geojson."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Save a PNG of the query, its top results and a map."
    ),
    include_query: bool = typer.Option(
        False, "--include-query", help="Keep the query patch(es) among the results."
    ),
    within: str | None = typer.Option(
        None,
        "--within",
        help="Only results intersecting W,S,E,N (degrees) or the polygons of a .gpkg/.geojson "
        "file (any CRS).",
    ),
    after: str | None = typer.Option(
        None, "--after", help="Only results acquired on or after DATE (YYYY-MM-DD)."
    ),
    before: str | None = typer.Option(
        None, "--before", help="Only results acquired on or before DATE (YYYY-MM-DD)."
    ),
    query_expansion: int | None = typer.Option(
        None,
        "--query-expansion",
        help="Average the query with its N nearest patches before ranking (default: the "
        "session's or model's setting; 0 = rank by the query alone, e.g. to look up an image).",
    ),
) -> None:
    """Find the patches most similar to a patch, a place, a box or an image, optionally
    only within an area (--within) and a time window (--after, --before): the filters apply
    before ranking, so k results come back whenever k patches pass them."""
    from anneal_geo.retrieval.filters import SearchFilter
    from anneal_geo.retrieval.geoindex import GeoIndex, export_results, plot_results

    given = [name for name, v in (("--patch", patch), ("--point", point), ("--bbox", bbox),
                                  ("--image", image)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ConfigError(
            "give exactly one of --patch ID, --point LON,LAT, --bbox W,S,E,N or --image FILE"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if out is not None and out.suffix.lower() not in (".gpkg", ".geojson", ".json"):
        raise ConfigError(f"--out {out}: use a .gpkg (GeoPackage) or .geojson file")
    filters = SearchFilter.from_options(within, after, before)
    geo = GeoIndex.load(index_path)
    note = geo.staleness()
    if note:
        typer.echo(f"note: {note}", err=True)
    try:
        how: dict[str, Any] = {"filters": filters, "query_expansion": query_expansion}
        if patch is not None:
            results = geo.query_patch(patch, k, include_query=include_query, **how)
        elif point is not None:
            lon, lat = numbers(point, 2, "--point", "103.75,17.92")
            results = geo.query_point(lon, lat, k, include_query=include_query, **how)
        elif bbox is not None:
            w, s, e, n = numbers(bbox, 4, "--bbox", "103.72,17.90,103.76,17.93")
            results = geo.query_bbox(w, s, e, n, k, include_query=include_query, **how)
        else:
            assert image is not None
            results = geo.query_image(image, k, **how)
        _show(results)
        if out is not None:
            typer.echo(f"wrote {len(results)} results to {export_results(results, out)}")
        if plot is not None:
            typer.echo(f"saved the quick look to {plot_results(geo, results, plot)}")
    finally:
        geo.close()
