"""`anneal-geo plugins list|show|check`: the installed plugins and command groups."""

from __future__ import annotations

from typing import Any

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


def _named(name: str, group: str | None) -> list[tuple[str, str]]:
    """``(group, name)`` of every listed plugin called ``name`` (metadata only)."""
    from anneal_geo import plugins

    groups = [group] if group else list(plugins.GROUPS)
    found = [(g, name) for g in groups if plugins.find(g, name) is not None]
    if not found:
        raise DataError(f"no plugin named '{name}'; see `anneal-geo plugins list`")
    return found


def _option_line(spec: Any) -> str:
    from anneal_geo._options import REQUIRED

    default = "required" if spec.default is REQUIRED else f"default {spec.default!r}"
    kind = f" ({spec.type})" if spec.type else ""
    text = f": {spec.description}" if spec.description else ""
    return f"  {spec.name}{kind}, {default}{text}"


@app.command("show")
def plugins_show(
    name: str = typer.Argument(..., help="Plugin name."),
    group: str | None = typer.Option(None, "--group", "-g", help="Restrict to one group."),
) -> None:
    """Describe a plugin: what it does, its capabilities, its options (with defaults and
    types), where it comes from, and how to set its options from the command line."""
    from anneal_geo import plugins

    for index, (g, n) in enumerate(_named(name, group)):
        if index:
            typer.echo("")
        d = plugins.describe(g, n)
        info = d.info
        typer.echo(f"{g[:-1]} plugin '{n}': {info.target}")
        typer.echo(f"from:         {info.distribution} {info.version}".rstrip())
        typer.echo(f"contract:     {g[:-1]} contract version {d.contract_version}")
        if d.capabilities:
            flags = ", ".join(f"{k}={v}" for k, v in d.capabilities.items())
            typer.echo(f"capabilities: {flags}")
        typer.echo(f"description:  {d.description or '(none)'}")
        if d.options:
            typer.echo(f"options (--{g[:-1]}-option KEY=VALUE, or [{g[:-1]}_options] in --config):")
            for spec in d.options.values():
                typer.echo(_option_line(spec))
        else:
            typer.echo("options:      none")


@app.command("check")
def plugins_check(
    name: str = typer.Argument(..., help="Plugin name."),
    group: str | None = typer.Option(None, "--group", "-g", help="Restrict to one group."),
    conformance: bool = typer.Option(
        False,
        "--conformance",
        help="Also run the conformance kit (anneal_geo.testing) on real Sentinel-2 data: "
        "shapes, determinism, random state, edge cases.",
    ),
    option: list[str] | None = typer.Option(
        None, "--option", metavar="KEY=VALUE", help="A plugin option for the kit (repeatable)."
    ),
) -> None:
    """Load one plugin and report whether it fulfils its contract (exit 1 if broken)."""
    from anneal_geo import plugins
    from anneal_geo._options import parse_assignments

    options = parse_assignments(option or [], "--option")
    broken = False
    for g, n in _named(name, group):
        report = next(p for p in plugins.inspect_all(g) if p.name == n)
        status = "ok" if report.status == "ok" else f"BROKEN: {report.reason}"
        typer.echo(
            f"{g}/{n}: {report.target} from {report.distribution} {report.version}: {status}"
        )
        broken |= report.status != "ok"
        if conformance and report.status == "ok":
            from anneal_geo.testing import ConformanceError, check_plugin

            try:
                result = check_plugin(g, n, options=options or None)
            except ConformanceError as exc:
                typer.echo(f"conformance: FAILED\n{exc}")
                broken = True
            else:
                typer.echo(f"conformance: {result}")
    if broken:
        raise typer.Exit(1)
