"""`anneal-geo pool build|info`: read rasters once into a pool directory, describe one."""

from __future__ import annotations

from pathlib import Path

import typer

from anneal_geo.cli._common import load_pool, split_bands
from anneal_geo.errors import ConfigError

__all__ = ["app"]

app = typer.Typer(name="pool", help="Build and describe patch pools.", no_args_is_help=True)


@app.command("build")
def pool_build(
    source: Path = typer.Argument(
        ..., help="Class-per-folder directory, BigEarthNet folder or folder of Sentinel-2 tiles."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the pool to."),
    bands: str | None = typer.Option(None, help="Comma-separated band names to keep, in order."),
    patch_size: int | None = typer.Option(
        None, "--patch-size", help="Tiles: patch side in pixels (default 64)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Tiles: pixels between patches (default: the patch size)."
    ),
    res: float | None = typer.Option(
        None, "--res", help="Tiles: pixel size in CRS units (default: the finest band, 10 m)."
    ),
    cloud_mask: str = typer.Option(
        "auto",
        "--cloud-mask",
        help="Tiles: auto (cloud_mask.tif beside the bands), none, or "
        "a mask file name or path (non-zero = cloud).",
    ),
    max_nodata: float = typer.Option(
        0.5,
        "--max-nodata",
        help="Tiles: skip patches with more than this share of nodata or cloud pixels.",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Tiles: reader threads, over scenes and bands (default: one per core, at most "
        "8; the pool is the same whatever the number).",
    ),
    nan_as_nodata: bool = typer.Option(
        False,
        "--nan-as-nodata",
        help="Treat NaN pixels of float rasters as nodata: fill each with its band's mean "
        "(without it, NaN is an error naming the files).",
    ),
    store: str = typer.Option(
        "array",
        "--store",
        help="Tiles: array (copy every patch into patches.npy) or tiles (keep only each "
        "patch's window, windows.npz, and read its pixels from the tiles when asked: "
        "the same values, a pool of a few MB).",
    ),
) -> None:
    """Read the rasters once into a pool directory (pool.json, patches.npy, footprints.gpkg).

    A BigEarthNet folder (<patch>/<patch>_B02.tif ...) is read as BigEarthNet (120 px
    patches at 10 m, multi-labels from the JSON). A folder of Sentinel-2 tiles (one file per
    band, e.g. Major TOM's B04.tif, or multi-band scenes) is cut into patches through
    TorchGeo; so is any source given --patch-size, --stride or --res. --workers threads
    read its scenes and bands in parallel. --store tiles keeps the windows only: the pool
    then reads its pixels from the tiles, which must stay where they are (or move together
    with the pool).
    """
    import time

    from anneal_geo.data.bigearthnet import is_bigearthnet
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.data.tiles import is_tile_archive

    t0 = time.perf_counter()
    store = store.lower()
    if store not in ("array", "tiles"):
        raise ConfigError(f"--store {store} is not one of array, tiles; pick one")
    cut = any(v is not None for v in (patch_size, stride, res))
    tiles = cut or is_tile_archive(source)
    ready_cut = is_bigearthnet(source) or (source / "pool.json").is_file()
    if store == "tiles" and (not tiles or ready_cut):
        raise ConfigError(
            f"--store tiles reads its pixels from a tile archive, and {source} is not one "
            "(a folder of Sentinel-2 tiles); leave --store out for this source"
        )
    if is_bigearthnet(source) and not (source / "pool.json").is_file():
        # Checked before the tile layout: a BigEarthNet patch folder also holds one file
        # per band, but its patches are ready-cut and labelled.
        if cut:
            raise ConfigError(
                f"{source} is a BigEarthNet folder of ready-cut 120 px patches; "
                "--patch-size, --stride and --res apply to tile archives only"
            )
        pool = PatchPool.from_bigearthnet(source, nan_as_nodata=nan_as_nodata)
        if bands:
            pool = pool.select_bands(split_bands(bands) or [])
    elif tiles:
        pool = PatchPool.from_tiles(
            source,
            64 if patch_size is None else patch_size,
            stride=stride,
            bands=split_bands(bands),
            res=res,
            cloud_mask=None if cloud_mask.lower() == "none" else cloud_mask,
            max_nodata=max_nodata,
            num_workers=workers,
            on_report=lambda report: typer.echo(report.summary()),
            nan_as_nodata=nan_as_nodata,
            store=store,
            out=out,
        )
    else:
        pool = load_pool(source, split_bands(bands), nan_as_nodata=nan_as_nodata)
    pool.save(out)  # the tiles store is written as it is built: nothing more to do
    typer.echo(f"built {len(pool)} patches in {time.perf_counter() - t0:.1f} s -> {out}")
    typer.echo(pool.describe())


@app.command("info")
def pool_info(directory: Path = typer.Argument(..., help="A pool directory.")) -> None:
    """Describe a saved pool: size, bands, classes, CRSs, store kind and disk used."""
    from anneal_geo.data.pool import PatchPool

    typer.echo(PatchPool.open(directory).describe())
