"""Command groups through the ``anneal_geo.cli`` entry-point group: the built-ins, a real
third-party distribution that adds a subcommand, and broken ones that never break the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("anneal-geo")

GOOD = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling>=1.25"]
        build-backend = "hatchling.build"

        [project]
        name = "acme-geo-tools"
        version = "1.4.0"
        requires-python = ">=3.12"

        [project.entry-points."anneal_geo.cli"]
        acme = "acme_geo_tools.cli:app"

        [tool.hatch.build.targets.wheel]
        packages = ["acme_geo_tools"]
        """,
    "acme_geo_tools/__init__.py": "",
    "acme_geo_tools/cli.py": """
        import typer

        app = typer.Typer(name="acme", help="Acme's tools for anneal-geo.", no_args_is_help=True)

        @app.command("hello")
        def hello(who: str = typer.Argument("world")) -> None:
            '''Say hello.'''
            typer.echo(f"hello {who} from acme")
        """,
}

BROKEN = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling>=1.25"]
        build-backend = "hatchling.build"

        [project]
        name = "acme-broken-cli"
        version = "0.0.2"
        requires-python = ">=3.12"

        [project.entry-points."anneal_geo.cli"]
        crash = "acme_broken_cli.cli:app"
        notatyper = "acme_broken_cli.other:thing"
        hijack = "acme_broken_cli.other:hijack"

        [tool.hatch.build.targets.wheel]
        packages = ["acme_broken_cli"]
        """,
    "acme_broken_cli/__init__.py": "",
    "acme_broken_cli/cli.py": """
        import acme_dependency_that_is_not_installed  # noqa: F401
        """,
    "acme_broken_cli/other.py": """
        import typer

        thing = 42
        hijack = typer.Typer()

        @hijack.command("run")
        def run() -> None:
            '''Claims the built-in `run`.'''
            typer.echo("hijacked")
        """,
}


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, pip_install: Callable[[Path, Path], None]
) -> Path:
    """Both distributions pip-installed into one target folder (not the environment)."""
    base = tmp_path_factory.mktemp("cli_plugins")
    target = base / "site"
    pip_install(_write(base / "good", GOOD), target)
    pip_install(_write(base / "broken", BROKEN), target)
    return target


def _cli(args: list[str], site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, env=env, timeout=120
    )


BUILTIN_COMMANDS = ("run", "resume", "label", "index", "query", "embed", "session", "pool",
                    "plugins")  # fmt: skip


def test_help_lists_every_builtin_command_and_h_works() -> None:
    long, short = _cli(["--help"]), _cli(["-h"])
    assert long.returncode == 0 and short.returncode == 0, long.stderr
    assert long.stdout == short.stdout
    for command in BUILTIN_COMMANDS:
        assert f" {command} " in long.stdout, command
    sub = _cli(["pool", "-h"])
    assert sub.returncode == 0 and "build" in sub.stdout and "info" in sub.stdout


def test_a_third_party_subcommand_is_added_and_runs(installed: Path) -> None:
    help_text = _cli(["--help"], installed)
    assert help_text.returncode == 0, help_text.stderr
    assert " acme " in help_text.stdout and "Acme's tools" in help_text.stdout
    hello = _cli(["acme", "hello", "GIS"], installed)
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "hello GIS from acme"


def test_broken_groups_are_listed_and_never_break_the_cli(installed: Path) -> None:
    help_text = _cli(["--help"], installed)
    assert help_text.returncode == 0, help_text.stderr
    out = help_text.stdout
    assert " crash " in out and "BROKEN: import failed: ModuleNotFoundError" in out
    assert " notatyper " in out and "is 'int', not a typer.Typer" in out
    # The built-in `run` is still ours, not the hijacker's.
    for command in BUILTIN_COMMANDS:
        assert f" {command} " in out
    listed = _cli(["plugins", "list", "--group", "cli"], installed)
    assert listed.returncode == 0, listed.stderr
    assert "broken cli/crash: import failed: ModuleNotFoundError" in listed.stdout
    assert "broken cli/hijack: command 'run' is already provided by anneal-geo" in listed.stdout
    assert "acme-geo-tools 1.4.0" in listed.stdout
    crash = _cli(["crash", "--anything"], installed)
    assert crash.returncode == 1
    assert crash.stderr.strip().startswith("error: command 'crash' (from acme-broken-cli 0.0.2)")
    assert "Traceback" not in crash.stderr
    # The working commands still work next to the broken ones.
    version = _cli(["--version"], installed)
    assert version.returncode == 0 and version.stdout.startswith("anneal-geo ")
    run_help = _cli(["run", "--help"], installed)
    assert run_help.returncode == 0 and "--estimator" in run_help.stdout


def test_the_builtin_groups_are_entry_points_of_our_own_distribution() -> None:
    from anneal_geo.cli.extensions import discover

    groups = {g.name: g for g in discover()}
    for name in ("run", "pool", "label", "session", "plugins", "geo", "embed"):
        assert groups[name].distribution == "anneal-geo", name
        assert groups[name].status == "ok", groups[name].reason
    assert groups["run"].commands == ("run", "resume")
    assert groups["pool"].commands == ("pool",)
