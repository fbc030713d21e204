"""`anneal-geo embed`: embed a pool in chunks, in this process or on a Dask cluster
(heavy imports stay inside the command)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from anneal_geo.errors import ConfigError

__all__ = ["app"]

app = typer.Typer()


@app.command("embed")
def embed(
    pool: Path = typer.Argument(..., help="A pool directory (anneal-geo pool build)."),
    backbone: str = typer.Option("spectral", help="Backbone plugin (spectral, smallcnn, ...)."),
    scheduler: str | None = typer.Option(
        None, help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (workers must see POOL)."
    ),
    local_workers: int = typer.Option(
        0, "--local-workers", help="Start a local Dask cluster of N worker processes."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="The .npy file to write (default: <pool name>_<backbone>.npy)."
    ),
    checkpoint: Path | None = typer.Option(
        None, help="A session checkpoint: write its embeddings instead of trunk features."
    ),
    bands: str | None = typer.Option(None, help="Comma-separated band names to use, in order."),
    options: str | None = typer.Option(None, help="Backbone options as a JSON object."),
    seed: int = typer.Option(0, help="The backbone's seed (as the session's)."),
    chunk: int = typer.Option(4096, help="Patches per task."),
) -> None:
    """Write the (N, D) float32 features of every patch of POOL, in patch-id order.

    Without --scheduler or --local-workers the chunks run in this process; either way only
    one chunk of raw patches is read into memory at a time (patches.npy is memory-mapped)
    and the result is written to OUT as it arrives.
    """
    from anneal_geo.distributed import embed_pool

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
    target = out if out is not None else Path(f"{pool.resolve().name}_{backbone}.npy")
    stats: dict[str, object] = {}
    embed_pool(
        pool,
        backbone,
        scheduler=scheduler,
        n_workers=local_workers,
        chunk=chunk,
        backbone_options=backbone_options,
        seed=seed,
        bands=[b.strip() for b in bands.split(",") if b.strip()] if bands else None,
        checkpoint=checkpoint,
        out=target,
        stats=stats,
    )
    where = scheduler or (f"{local_workers} local workers" if local_workers else "this process")
    typer.echo(
        f"embedded {stats['n']} patches ({stats['dim']}-d, {stats['chunks']} chunks on "
        f"{where}) in {stats['seconds']} s -> {target}"
    )
