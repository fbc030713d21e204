"""Checking installed plugins by their registry name."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from anneal_geo import plugins
from anneal_geo.errors import PluginError
from anneal_geo.testing.annotators import check_annotator
from anneal_geo.testing.backbones import check_backbone
from anneal_geo.testing.core import _group
from anneal_geo.testing.estimators import check_estimator
from anneal_geo.testing.report import ConformanceError, ConformanceReport
from anneal_geo.testing.sample import Sample
from anneal_geo.testing.selectors import check_selector

__all__ = ["check_plugin", "plugin_cases"]

_CHECKERS: dict[str, Callable[..., ConformanceReport]] = {
    "estimators": check_estimator,
    "selectors": check_selector,
    "backbones": check_backbone,
    "annotators": check_annotator,
}


def check_plugin(
    group: str,
    name: str,
    *,
    options: dict[str, Any] | None = None,
    sample: Sample | None = None,
) -> ConformanceReport:
    """Check an installed plugin by its registry name: listed, loads, keeps its contract.

    Args:
        group: ``estimators``, ``selectors``, ``backbones`` or ``annotators`` (``estimator``
            and ``anneal_geo.estimators`` work too).
        name: the plugin name (``anneal-geo plugins list``).
        options: constructor options.
        sample: the data (default: :func:`load_sample`).

    Raises:
        ConformanceError: not installed, fails to load, or a check failed.
    """
    short = _group(group)
    found = [info for info in plugins.available(short) if info.name == name]
    if not found:
        known = ", ".join(info.name for info in plugins.available(short)) or "none"
        raise ConformanceError(
            f"no {short[:-1]} plugin named '{name}' is installed (known: {known}); install its "
            "distribution (pip install -e .) so its entry point is visible"
        )
    info = found[0]
    if info.distribution != "<in-process>" and (info.distribution == "unknown" or not info.version):
        raise ConformanceError(
            f"{info.origin} fails the 'listed' check: its entry point has no distribution "
            "name and version; declare it in an installed distribution's pyproject.toml"
        )
    try:
        cls = plugins.load(short, name)
    except PluginError as exc:
        raise ConformanceError(f"{info.origin} fails the 'load' check: {exc}") from exc
    report = _CHECKERS[short](cls, options=options, sample=sample)
    report.passed[:0] = ["listed", "load"]
    return report


def plugin_cases(group: str | None = None, *, distribution: str | None = None) -> list[Any]:
    """``(group, name)`` of every installed plugin, as pytest parameters with readable ids.

    Reads entry-point metadata only (imports no plugin), so it is cheap at collection time::

        @pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="my-dist"))
        def test_conformance(group, name):
            check_plugin(group, name)

    Args:
        group: only this group.
        distribution: only the plugins this distribution declares (``-``/``_`` and case are
            ignored).

    Returns:
        ``pytest.param(group, name, id="group/name")`` items (plain tuples without pytest).

    Raises:
        ConformanceError: ``distribution`` declares no plugin (not installed?), so a
            parametrised test is never silently empty.
    """
    groups = [_group(group)] if group else list(plugins.GROUPS)

    def norm(text: str) -> str:
        return text.lower().replace("_", "-")

    cases = [
        (g, info.name)
        for g in groups
        for info in plugins.available(g)
        if distribution is None or norm(info.distribution) == norm(distribution)
    ]
    if distribution is not None and not cases:
        raise ConformanceError(
            f"distribution '{distribution}' declares no {' or '.join(groups)} plugin; is it "
            "installed (pip install -e .) and are its entry points in pyproject.toml?"
        )
    pytest = sys.modules.get("pytest")
    if pytest is None:
        return cases
    return [pytest.param(g, name, id=f"{g}/{name}") for g, name in cases]
