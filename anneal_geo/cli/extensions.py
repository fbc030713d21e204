"""Command groups of the ``anneal-geo`` command, discovered through entry points.

Every command group, the built-in ones included, is an entry point of the group
``anneal_geo.cli`` whose target is a :class:`typer.Typer`:

- a Typer created with a ``name`` (``typer.Typer(name="pool", ...)``) becomes a subcommand
  group, ``anneal-geo pool build``;
- a Typer without a name adds its commands at the top level, ``anneal-geo run``.

A third-party distribution adds a subcommand the same way in its own ``pyproject.toml``::

    [project.entry-points."anneal_geo.cli"]
    tiles = "my_package.cli:app"

Loading imports each target module (command modules keep heavy imports inside their
commands, so this stays fast). A target that fails to import, is not a Typer, or clashes
with a command that is already there is reported as broken: it shows up in
``anneal-geo --help`` and ``anneal-geo plugins list`` with the reason, and running it says
why in one line; it never breaks the rest of the command.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = ["GROUP", "CommandGroup", "discover"]

#: The entry-point group of command groups.
GROUP = "anneal_geo.cli"
#: Our own distribution: its command groups are loaded first and win name clashes.
_OWN = "anneal-geo"
_OWN_ORDER = ("run", "label", "session", "pool", "geo", "export", "embed", "plugins")


@dataclass(frozen=True)
class CommandGroup:
    """One ``anneal_geo.cli`` entry point and what loading it gave.

    Attributes:
        name: the entry point's name.
        target: ``module:attribute``.
        distribution: the distribution that declares it ("" when unknown).
        version: that distribution's version.
        typer_app: the loaded Typer (None when broken).
        commands: the top-level command names it adds (its group name for a named Typer).
        reason: why it is broken ("" when it loaded).
    """

    name: str
    target: str
    distribution: str
    version: str
    typer_app: Any
    commands: tuple[str, ...]
    reason: str = ""

    @property
    def status(self) -> str:
        """``"ok"`` or ``"broken"``."""
        return "broken" if self.reason else "ok"


def _command_names(app: Any) -> tuple[str, ...]:
    if app.info.name:
        return (str(app.info.name),)
    names = []
    for command in app.registered_commands:
        callback = command.callback
        names.append(command.name or callback.__name__.replace("_", "-"))
    for group in app.registered_groups:
        names.append(group.name or group.typer_instance.info.name)
    return tuple(str(n) for n in names)


def _entry_points() -> list[tuple[md.EntryPoint, str, str]]:
    found = []
    for ep in md.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.metadata["Name"] if dist is not None else ""
        version = dist.version if dist is not None else ""
        found.append((ep, name or "", version or ""))
    # Our own groups first, in the order of the usual work (they win clashes), then the
    # others by distribution and name.
    def key(t: tuple[md.EntryPoint, str, str]) -> tuple[bool, str, int, str]:
        ep, dist, _ = t
        rank = _OWN_ORDER.index(ep.name) if dist == _OWN and ep.name in _OWN_ORDER else 99
        return (dist != _OWN, dist.lower(), rank, ep.name)

    found.sort(key=key)
    return found


@cache
def discover() -> tuple[CommandGroup, ...]:
    """Load every ``anneal_geo.cli`` entry point once; broken ones carry their reason."""
    import typer

    taken: dict[str, str] = {}
    groups = []
    seen: set[tuple[str, str]] = set()
    for ep, dist, version in _entry_points():
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        app: Any = None
        commands: tuple[str, ...] = ()
        reason = ""
        try:
            app = ep.load()
        except Exception as exc:  # a broken plugin must not break the command
            first = (str(exc).splitlines() or [""])[0]
            reason = f"import failed: {type(exc).__name__}: {first}".rstrip(": ")
        if not reason and not isinstance(app, typer.Typer):
            reason = f"{ep.value} is {type(app).__name__!r}, not a typer.Typer"
        if not reason:
            commands = _command_names(app)
            clashes = [c for c in commands if c in taken]
            if clashes:
                owner = taken[clashes[0]]
                reason = f"command '{clashes[0]}' is already provided by {owner}"
        if reason:
            app = None
            commands = (ep.name,) if ep.name not in taken else ()
        for command in commands:
            taken[command] = f"{dist or 'an unknown distribution'} ({ep.name})"
        groups.append(CommandGroup(ep.name, ep.value, dist, version, app, commands, reason))
    return tuple(groups)
