"""docs/plugins.md works as written: its minimal plugin is extracted, installed, listed and run.

The plugin's files are the fenced blocks of the guide whose info string carries a title, e.g.
```` ```toml title="pyproject.toml" ````; the title is the file's path inside the plugin.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from anneal_geo import plugins
from anneal_geo.testing import check_plugin

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
CLI = Path(sys.executable).with_name("anneal-geo")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'\btitle="(?P<path>[^"]+)"')


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, title or None, body) of every fenced block of the guide."""
    out = []
    for match in FENCE.finditer(GUIDE.read_text(encoding="utf-8")):
        title = TITLE.search(match["info"])
        out.append((match["lang"], title["path"] if title else None, match["body"]))
    return out


def plugin_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for _, title, body in blocks():
        if title is None:
            continue
        path = Path(title)
        assert not path.is_absolute() and ".." not in path.parts, f"unsafe title {title}"
        assert title not in files, f"two blocks are titled {title}"
        files[title] = body
    return files


@pytest.fixture(scope="module")
def guide_plugin(tmp_path_factory, pip_install):
    """The guide's plugin, written out and pip-installed into a temporary --target folder."""
    root = tmp_path_factory.mktemp("guide")
    source = root / "anneal-geo-cosine"
    for title, body in plugin_files().items():
        (source / title).parent.mkdir(parents=True, exist_ok=True)
        (source / title).write_text(body, encoding="utf-8")
    target = root / "site"
    pip_install(source, target)
    return source, target


def with_path(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target)}


def test_the_guide_holds_a_complete_plugin_and_valid_snippets():
    files = plugin_files()
    assert {"pyproject.toml", "anneal_geo_cosine/__init__.py", "tests/test_cosine.py"} <= set(files)
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == "anneal-geo-cosine"
    entry = project["project"]["entry-points"]["anneal_geo.estimators"]["cosine"]
    assert entry == "anneal_geo_cosine:CosineMarginEstimator"
    # Every other snippet is at least valid syntax.
    for lang, title, body in blocks():
        if lang == "python":
            compile(body, title or "docs/plugins.md", "exec")
        elif lang == "toml":
            tomllib.loads(body)


def test_the_installed_guide_plugin_is_listed_with_its_distribution(guide_plugin):
    _, target = guide_plugin
    listed = subprocess.run(
        [str(CLI), "plugins", "list", "--group", "estimators"],
        capture_output=True,
        text=True,
        env=with_path(target),
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("cosine "))
    assert re.search(
        r"anneal_geo_cosine:CosineMarginEstimator\s+anneal-geo-cosine 0\.1\.0\s+ok", row
    )
    assert "Uncertainty = closeness" in row


def test_the_guide_plugin_passes_the_kit(guide_plugin, monkeypatch):
    _, target = guide_plugin
    monkeypatch.syspath_prepend(str(target))
    plugins.refresh()
    try:
        report = check_plugin("estimators", "cosine")
        assert {"listed", "load", "contract version", "symmetric"} <= set(report.passed)
        assert plugins.create("estimators", "cosine", seed=0, start=0.2).midpoint == 0.2
    finally:
        for name in [m for m in sys.modules if m.startswith("anneal_geo_cosine")]:
            del sys.modules[name]
        plugins.refresh()


def test_the_guide_plugin_own_tests_pass(guide_plugin):
    """The guide's test file: the kit by registry name and a real session (engine, oracle)."""
    source, target = guide_plugin
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=source,
        capture_output=True,
        text=True,
        env=with_path(target),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout


def test_the_guide_run_command_works(guide_plugin, tmp_path):
    _, target = guide_plugin
    text = GUIDE.read_text(encoding="utf-8")
    line = next(
        line
        for line in text.splitlines()
        if line.startswith(".venv/bin/anneal-geo run --estimator cosine")
    )
    args = shlex.split(line)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    result = subprocess.run(
        [str(CLI), *args],
        capture_output=True,
        text=True,
        env=with_path(target),
        cwd=GUIDE.parent.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cosine + kmeans" in result.stdout and "done: 30 queried pairs" in result.stdout
