"""The plugin registry: discovery through real entry points, broken plugins, clashes, register()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from anneal_geo import plugins
from anneal_geo.errors import PluginError
from anneal_geo.estimators.base import Estimator
from anneal_geo.selectors.base import Selector

BUILTINS = {
    "estimators": {"mgue", "bcgue", "random"},
    "selectors": {"kmeans", "topk", "random"},
    "backbones": {"spectral", "resnet18", "smallcnn"},
    "annotators": {"oracle", "terminal", "widget"},
}


def make_distribution(
    root: Path,
    dist: str,
    version: str,
    module: str,
    source: str,
    entry_points: dict[str, dict[str, str]],
) -> None:
    """Write a real installed distribution (dist-info + module) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, items in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in items.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A third-party distribution with a good, a broken-import and a contract-breaking plugin."""
    make_distribution(
        tmp_path,
        "acme-estimators",
        "2.3.1",
        "acme_plugins",
        """
        import numpy as np
        from anneal_geo.estimators.base import Estimator

        class DistanceEstimator(Estimator):
            '''Uncertainty = distance of the pair (a toy).'''
            def score(self, embeddings, pairs):
                return np.linalg.norm(embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]], axis=1)

        class WrongShape(Estimator):
            '''Returns one value too few.'''
            def score(self, embeddings, pairs):
                return np.zeros(len(pairs) - 1)

        class NotAnEstimator:
            pass

        class MgueClone(DistanceEstimator):
            '''Claims the built-in name.'''
        """,
        {
            "anneal_geo.estimators": {
                "acme-distance": "acme_plugins:DistanceEstimator",
                "acme-wrong-shape": "acme_plugins:WrongShape",
                "acme-not-a-class": "acme_plugins:NotAnEstimator",
                "acme-import-error": "acme_missing_module:Thing",
                "mgue": "acme_plugins:MgueClone",
            }
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.refresh()
    yield tmp_path
    sys.modules.pop("acme_plugins", None)
    plugins.refresh()


def test_builtins_are_listed_from_entry_points_without_importing_them():
    for group, expected in BUILTINS.items():
        infos = plugins.available(group)
        assert expected <= {i.name for i in infos}
        for info in infos:
            if info.name in expected:
                assert info.distribution == "anneal-geo"
                assert info.status == "unchecked"


@pytest.mark.parametrize("group", sorted(BUILTINS))
def test_every_builtin_loads_and_fulfils_its_contract(group):
    for info in plugins.inspect_all(group):
        if info.name in BUILTINS[group]:
            assert info.status == "ok", info.reason
            assert info.description


def test_third_party_plugin_is_discovered_loaded_and_used(third_party):
    info = {i.name: i for i in plugins.available("estimators")}["acme-distance"]
    assert info.distribution == "acme-estimators" and info.version == "2.3.1"
    est = plugins.create("estimators", "acme-distance", seed=1)
    emb = np.eye(4, dtype=np.float32)
    scores = est.checked_score(emb, np.array([[0, 1], [2, 3]]))
    np.testing.assert_allclose(scores, [np.sqrt(2), np.sqrt(2)], rtol=1e-6)


def test_broken_plugins_are_listed_with_reason_and_never_crash_listing(third_party):
    report = {i.name: i for i in plugins.inspect_all("estimators")}
    broken = report["acme-import-error"]
    assert broken.status == "broken"
    assert "acme-estimators" in broken.reason and "ModuleNotFoundError" in broken.reason
    assert report["acme-not-a-class"].status == "broken"
    assert "does not subclass" in report["acme-not-a-class"].reason
    # Plugins that do work are still usable in the same process.
    assert report["acme-distance"].status == "ok"
    assert report["mgue"].status == "ok"


def test_contract_violation_names_plugin_and_distribution(third_party):
    est = plugins.create("estimators", "acme-wrong-shape")
    with pytest.raises(PluginError, match=r"acme-wrong-shape.*acme-estimators 2\.3\.1.*shape"):
        est.checked_score(np.eye(3, dtype=np.float32), np.array([[0, 1], [1, 2]]))


def test_name_clash_warns_and_builtin_wins_deterministically(third_party):
    with pytest.warns(RuntimeWarning, match="'mgue' is declared more than once"):
        infos = plugins.available("estimators")
    winner = {i.name: i for i in infos}["mgue"]
    assert winner.distribution == "anneal-geo"
    assert winner.target == "anneal_geo.estimators.mgue:MGUEEstimator"


def test_unknown_name_lists_known_ones():
    with pytest.raises(PluginError, match=r"unknown selector 'nope'.*kmeans.*random.*topk"):
        plugins.load("selectors", "nope")
    with pytest.raises(PluginError, match="unknown plugin group"):
        plugins.available("widgets")


def test_register_in_process_wins_and_unregister_restores():
    class Everything(Selector):
        """Take the first k."""

        def select(self, descriptors, uncertainty, k, rng):
            return np.arange(k)

    try:
        plugins.register(Everything, name="topk")
        assert plugins.load("selectors", "topk") is Everything
        sel = plugins.create("selectors", "topk")
        out = sel.checked_select(np.zeros((5, 2)), np.arange(5.0), 3)
        np.testing.assert_array_equal(out, [0, 1, 2])
    finally:
        plugins.unregister("topk", "selectors")
    assert plugins.load("selectors", "topk").__name__ == "TopKSelector"


def test_register_rejects_non_contract_classes():
    class Half(Estimator):
        pass  # score() missing

    with pytest.raises(PluginError, match="does not implement score"):
        plugins.register(Half, group="estimators")
    with pytest.raises(PluginError, match="subclasses none"):
        plugins.register(int)


def test_selector_validation_rejects_repeats_and_out_of_range():
    class Repeats(Selector):
        def select(self, descriptors, uncertainty, k, rng):
            return np.zeros(k, dtype=int)

    class OutOfRange(Selector):
        def select(self, descriptors, uncertainty, k, rng):
            return np.arange(k) + 100

    with pytest.raises(PluginError, match="repeated"):
        Repeats().checked_select(np.zeros((5, 2)), np.zeros(5), 2)
    with pytest.raises(PluginError, match="outside"):
        OutOfRange().checked_select(np.zeros((5, 2)), np.zeros(5), 2)


def test_estimator_nan_and_exceptions_become_plugin_errors():
    class Nan(Estimator):
        def score(self, embeddings, pairs):
            return np.full(len(pairs), np.nan)

    class Raises(Estimator):
        def score(self, embeddings, pairs):
            raise ZeroDivisionError("boom")

    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(PluginError, match="NaN"):
        Nan().checked_score(emb, np.array([[0, 1]]))
    with pytest.raises(PluginError, match="ZeroDivisionError: boom"):
        Raises().checked_score(emb, np.array([[0, 1]]))


HEAVY = ("torch", "torchgeo", "faiss", "rasterio", "geopandas")


def _imported_after(code: str) -> set[str]:
    loaded = f"sorted(m for m in {HEAVY!r} if m in sys.modules)"
    probe = f"{code}\nimport sys\nprint('HEAVY:' + ' '.join({loaded}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY:"), out.stdout
    return set(last.removeprefix("HEAVY:").split())


def test_import_anneal_geo_imports_nothing_heavy():
    assert _imported_after("import anneal_geo") == set()


def test_listing_plugins_imports_nothing_heavy():
    code = "from anneal_geo import plugins\nfor g in plugins.GROUPS: plugins.available(g)"
    assert _imported_after(code) == set()


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys\nsys.argv = ['anneal-geo', '--help']\nfrom anneal_geo.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    assert _imported_after(code) == set()


def test_cli_plugins_list_and_check(third_party):
    from typer.testing import CliRunner

    from anneal_geo.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plugins", "list", "--group", "estimators"])
    assert result.exit_code == 0, result.output
    assert "acme-distance" in result.output and "acme-estimators 2.3.1" in result.output
    assert "broken estimators/acme-import-error" in result.output
    ok = runner.invoke(app, ["plugins", "check", "mgue", "--group", "estimators"])
    assert ok.exit_code == 0 and ": ok" in ok.output
    bad = runner.invoke(app, ["plugins", "check", "acme-import-error"])
    assert bad.exit_code == 1 and "BROKEN" in bad.output


def test_plugin_written_for_another_contract_version_is_refused():
    class Future(Estimator):
        """Written for a later contract."""

        contract_version = 2

        def score(self, embeddings, pairs):
            return np.zeros(len(pairs))

    with pytest.raises(PluginError, match="contract version 2, this anneal-geo provides 1"):
        plugins.register(Future, name="future")
