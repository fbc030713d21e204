"""`anneal-geo embed`: embed a saved pool, or a tile archive read where it lies, in this
process or on a Dask cluster (heavy imports stay inside the command)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from anneal_geo.errors import ConfigError, DataError

__all__ = ["app"]

app = typer.Typer()


@app.command("embed")
def embed(
    source: Path = typer.Argument(
        ...,
        metavar="SOURCE",
        help="A pool directory (anneal-geo pool build) or a folder of Sentinel-2 tiles.",
    ),
    backbone: str = typer.Option("spectral", help="Backbone plugin (spectral, texture, ...)."),
    model: Path | None = typer.Option(
        None, "--model", help="An exported model (anneal-geo export): write its embeddings."
    ),
    scheduler: str | None = typer.Option(
        None, help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (workers must see SOURCE)."
    ),
    local_workers: int = typer.Option(
        0, "--local-workers", help="Start a local Dask cluster of N worker processes."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="The .npy file to write (default: <source name>_<backbone or model>.npy).",
    ),
    checkpoint: Path | None = typer.Option(
        None, help="Pools: a session checkpoint: write its embeddings instead of trunk features."
    ),
    bands: str | None = typer.Option(
        None, help="Comma-separated band names to use (tiles: to read), in order."
    ),
    options: str | None = typer.Option(None, help="Backbone options as a JSON object."),
    seed: int = typer.Option(0, help="The backbone's seed (as the session's)."),
    chunk: int = typer.Option(4096, help="Pools: patches per task (tiles: one scene per task)."),
    patch_size: int | None = typer.Option(
        None, "--patch-size", help="Tiles: patch side in pixels (default 64)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Tiles: pixels between patches (default: the patch size)."
    ),
    res: float | None = typer.Option(
        None, "--res", help="Tiles: pixel size in CRS units (default: the finest band, 10 m)."
    ),
    cloud_mask: str | None = typer.Option(
        None,
        "--cloud-mask",
        help="Tiles: auto (default: cloud_mask.tif beside the bands), none, or a mask file "
        "name or path (non-zero = cloud).",
    ),
    max_nodata: float | None = typer.Option(
        None,
        "--max-nodata",
        help="Tiles: skip patches with more than this share of nodata or cloud pixels "
        "(default 0.5).",
    ),
    connect_timeout: float = typer.Option(
        30.0, "--connect-timeout", help="Seconds to wait for the scheduler at --scheduler."
    ),
) -> None:
    """Write the (N, D) float32 features of every patch of SOURCE, in patch-id order.

    SOURCE is a saved pool, or a tile archive: then no pool is built, each task reads one
    scene through TorchGeo where it lies (the patches of `pool build` with the same tile
    options, in the same order) and the footprints are written beside OUT
    (NAME.footprints.gpkg, NAME.json). Without --model the scenes are read twice: first for
    the per-band statistics the backbone standardises with. Without --scheduler or
    --local-workers the tasks run in this process.
    """
    from anneal_geo.data.pool import POOL_FILE

    if scheduler is not None and local_workers:
        raise ConfigError("give --scheduler or --local-workers, not both")
    if local_workers < 0:
        raise ConfigError(f"--local-workers {local_workers} must be 0 or more")
    try:
        backbone_options = json.loads(options) if options else {}
    except ValueError as exc:
        raise ConfigError(f"--options {options!r} is not a JSON object ({exc})") from exc
    if not isinstance(backbone_options, dict):
        raise ConfigError(f"--options {options!r} must be a JSON object, e.g. '{{\"k\": 1}}'")
    if not source.exists():
        raise DataError(f"{source} does not exist; give a pool directory or a folder of tiles")
    names = [b.strip() for b in bands.split(",") if b.strip()] if bands else None
    what = model.resolve().name if model is not None else backbone
    target = out if out is not None else Path(f"{source.resolve().name}_{what}.npy")
    where = scheduler or (f"{local_workers} local workers" if local_workers else "this process")
    stats: dict[str, object] = {}
    tile_options = {
        "--patch-size": patch_size,
        "--stride": stride,
        "--res": res,
        "--cloud-mask": cloud_mask,
        "--max-nodata": max_nodata,
    }
    if (source / POOL_FILE).is_file():
        given = [name for name, value in tile_options.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} apply to tile archives only; {source} is a saved pool "
                "(its patches are cut already)"
            )
        from anneal_geo.distributed import embed_pool

        embed_pool(
            source,
            backbone,
            scheduler=scheduler,
            n_workers=local_workers,
            chunk=chunk,
            backbone_options=backbone_options,
            seed=seed,
            bands=names,
            checkpoint=checkpoint,
            model=model,
            out=target,
            stats=stats,
            connect_timeout=connect_timeout,
        )
        typer.echo(
            f"embedded {stats['n']} patches ({stats['dim']}-d, {stats['chunks']} chunks on "
            f"{where}) in {stats['seconds']} s -> {target}"
        )
        return
    if checkpoint is not None:
        raise ConfigError(
            "--checkpoint applies to saved pools; for tiles export the session "
            "(anneal-geo export SESSION --out MODEL) and pass --model MODEL"
        )
    from anneal_geo.distributed import embed_tiles

    result = embed_tiles(
        source,
        backbone,
        model=model,
        scheduler=scheduler,
        n_workers=local_workers,
        patch_size=64 if patch_size is None else patch_size,
        stride=stride,
        bands=names,
        res=res,
        cloud_mask="auto" if cloud_mask is None else cloud_mask,
        max_nodata=0.5 if max_nodata is None else max_nodata,
        backbone_options=backbone_options,
        seed=seed,
        out=target,
        stats=stats,
        connect_timeout=connect_timeout,
    )
    typer.echo(result.report.summary())
    passes = "1 pass" if stats["passes"] == 1 else f"{stats['passes']} passes"
    typer.echo(
        f"embedded {stats['n']} patches ({stats['dim']}-d, {stats['scenes']} scene(s), "
        f"{passes} on {where}) in {stats['seconds']} s -> {target}"
    )
    for kind in ("footprints", "meta", "trunk_state"):
        if kind in result.files:
            typer.echo(f"  {kind.replace('_', ' ')}: {result.files[kind]}")
