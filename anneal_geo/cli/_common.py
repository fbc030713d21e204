"""Small helpers the command modules share: option parsing, pool loading, tables.

Command modules import from here, never from the package root (``anneal_geo.cli``), so the
CLI has no import circle. Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from anneal_geo.errors import ConfigError

__all__ = [
    "DEFAULT_DATA",
    "SAMPLE_TILES",
    "load_pool",
    "numbers",
    "print_table",
    "split_bands",
]

#: The shipped sample data (``sample_tiles/`` at the top of the repository).
SAMPLE_TILES = Path(__file__).resolve().parents[2] / "sample_tiles"
#: The sample the main job runs on when ``--data`` is not given.
DEFAULT_DATA = SAMPLE_TILES / "eurosat_ms"


def load_pool(
    source: Path, bands: list[str] | None = None, *, nan_as_nodata: bool = False
) -> Any:
    """A :class:`~anneal_geo.data.pool.PatchPool` from any accepted source, band-selected."""
    from anneal_geo.data.pool import PatchPool

    pool = PatchPool.load(source, nan_as_nodata=nan_as_nodata)
    return pool.select_bands(bands) if bands else pool


def split_bands(bands: str | None) -> list[str] | None:
    """``"B04, B03,B02"`` -> ``["B04", "B03", "B02"]``; None or empty -> None."""
    return [b.strip() for b in bands.split(",") if b.strip()] if bands else None


def numbers(text: str, count: int, option: str, example: str) -> list[float]:
    """Parse ``count`` comma-separated numbers given to ``option``, or a one-line error."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count:
        raise ConfigError(
            f"{option} {text!r} must be {count} comma-separated numbers, e.g. {example}"
        )
    return values


def print_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Print rows as left-aligned columns under a header and a rule."""
    text = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    for k, row in enumerate(text):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))
