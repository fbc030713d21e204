"""The root of the ``anneal-geo`` command: the app, ``--version``, and :func:`main`.

The command groups are not imported here: they are entry points of the group
``anneal_geo.cli`` (see :mod:`anneal_geo.cli.extensions`), added to :data:`app` when this
module is imported. Errors anneal-geo raises on purpose
(:class:`~anneal_geo.errors.AnnealError`) are printed as one line and exit with status 2;
Ctrl-C exits with 130 after saying what was kept.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

import anneal_geo
from anneal_geo.cli.extensions import CommandGroup, discover
from anneal_geo.errors import AnnealError

__all__ = ["app", "main"]

app = typer.Typer(
    help="ANNEAL: annotation cost-efficient active learning for Sentinel-2 image retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _no_type_after_flags() -> None:
    """typer's help panels print a type after every option, flags included (``--version
    <bool>``, ``--help <bool>``), which reads as if the flag took a value: show none."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_untyped", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    display_type_rich.flags_untyped = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_after_flags()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anneal-geo {anneal_geo.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
        show_default=False,
    ),
) -> None:
    """ANNEAL for Sentinel-2: ask an expert about a few well-chosen pairs, learn a metric
    space from the answers, and serve it as a retrieval index."""


def _broken_command(group: CommandGroup) -> None:
    where = f" (from {group.distribution} {group.version})" if group.distribution else ""
    message = f"command '{group.name}'{where} is broken: {group.reason}"

    def broken() -> None:
        typer.echo(f"error: {message}; reinstall or remove that distribution", err=True)
        raise typer.Exit(1)

    app.command(
        group.name,
        help=f"BROKEN: {group.reason}{where}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )(broken)


def _attach() -> None:
    for group in discover():
        if group.reason:
            if group.commands:  # not shadowing a working command of the same name
                _broken_command(group)
        elif group.typer_app.info.name:
            app.add_typer(group.typer_app)
        else:
            app.registered_commands.extend(group.typer_app.registered_commands)
            app.registered_groups.extend(group.typer_app.registered_groups)


_attach()


def main() -> None:
    """Entry point: run the app, turning anneal-geo errors into one-line messages."""
    try:
        app()
    except AnnealError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
