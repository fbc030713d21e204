"""`anneal-geo plugins list|check`: the installed plugins and command groups."""

from __future__ import annotations

import typer

from anneal_geo.cli._common import print_table
from anneal_geo.errors import DataError

__all__ = ["app"]

app = typer.Typer(name="plugins", help="List and check plugins.", no_args_is_help=True)


@app.command("list")
def plugins_list(
    group: str | None = typer.Option(
        None, "--group", "-g", help="estimators, selectors, backbones, annotators or cli."
    ),
) -> None:
    """List plugins and command groups with their origin, status and description (loads each
    one to check it)."""
    from anneal_geo import plugins
    from anneal_geo.cli.extensions import discover

    show_cli = group in (None, "cli")
    report = plugins.inspect_all(group) if group != "cli" else []
    header = ("name", "group", "target", "distribution", "status", "description")
    rows: list[tuple[str, ...]] = [
        (
            p.name,
            p.group,
            p.target,
            f"{p.distribution} {p.version}".strip(),
            p.status,
            p.description,
        )
        for p in report
    ]
    commands = discover() if show_cli else ()
    rows += [
        (
            c.name,
            "cli",
            c.target,
            f"{c.distribution} {c.version}".strip(),
            c.status,
            f"commands: {', '.join(c.commands)}" if c.commands and not c.reason else "",
        )
        for c in commands
    ]
    print_table(header, rows)
    for p in report:
        if p.status != "ok":
            typer.echo(f"broken {p.group}/{p.name}: {p.reason}")
    for c in commands:
        if c.reason:
            typer.echo(f"broken cli/{c.name}: {c.reason}")


@app.command("check")
def plugins_check(
    name: str = typer.Argument(..., help="Plugin name."),
    group: str | None = typer.Option(None, "--group", "-g", help="Restrict to one group."),
) -> None:
    """Load one plugin and report whether it fulfils its contract (exit 1 if broken)."""
    from anneal_geo import plugins

    found = [p for p in plugins.inspect_all(group) if p.name == name]
    if not found:
        raise DataError(f"no plugin named '{name}'; see `anneal-geo plugins list`")
    broken = False
    for p in found:
        status = "ok" if p.status == "ok" else f"BROKEN: {p.reason}"
        typer.echo(f"{p.group}/{p.name}: {p.target} from {p.distribution} {p.version}: {status}")
        broken |= p.status != "ok"
    if broken:
        raise typer.Exit(1)
