"""The ``anneal-geo`` command."""

from __future__ import annotations

import typer

import anneal_geo

app = typer.Typer(help="Annotation cost-efficient active learning for Sentinel-2 image retrieval.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anneal-geo {anneal_geo.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """anneal-geo."""


def main() -> None:
    app()
