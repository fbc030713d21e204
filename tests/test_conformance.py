"""The conformance kit: every installed plugin passes it, and each check catches what it names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anneal_geo import plugins, testing
from anneal_geo.annotators.base import Annotator
from anneal_geo.backbones.base import Backbone
from anneal_geo.errors import DataError, PluginError
from anneal_geo.estimators.base import Estimator
from anneal_geo.estimators.mgue import MGUEEstimator
from anneal_geo.selectors.base import Selector
from anneal_geo.testing import (
    ConformanceError,
    check_annotator,
    check_backbone,
    check_estimator,
    check_plugin,
    check_selector,
    load_sample,
    plugin_cases,
)

EUROSAT_MS = Path(__file__).resolve().parent.parent / "sample_tiles" / "eurosat_ms"
BUILTINS = {
    ("estimators", "mgue"),
    ("estimators", "bcgue"),
    ("estimators", "random"),
    ("selectors", "kmeans"),
    ("selectors", "topk"),
    ("selectors", "random"),
    ("backbones", "spectral"),
    ("backbones", "resnet18"),
    ("backbones", "smallcnn"),
    ("backbones", "texture"),
    ("annotators", "oracle"),
    ("annotators", "terminal"),
    ("annotators", "widget"),
}


# -- the registry, continuously ----------------------------------------------------------------


@pytest.mark.parametrize(("group", "name"), plugin_cases())
def test_every_installed_plugin_passes_the_kit(group, name):
    report = check_plugin(group, name)
    assert report.passed[:2] == ["listed", "load"]
    assert "signatures" in report.passed


def test_the_registry_cases_cover_every_builtin():
    cases = {tuple(case.values) for case in plugin_cases()}
    assert cases >= BUILTINS
    ids = [case.id for case in plugin_cases("estimators")]
    assert "estimators/mgue" in ids and all(i.startswith("estimators/") for i in ids)


def test_distribution_filter_and_empty_filter():
    cases = {tuple(case.values) for case in plugin_cases(distribution="anneal_geo")}
    assert cases == BUILTINS
    with pytest.raises(ConformanceError, match="'no-such-dist' declares no"):
        plugin_cases(distribution="no-such-dist")


def test_check_plugin_names_unknown_plugins_and_accepts_group_aliases():
    with pytest.raises(ConformanceError, match=r"no estimator plugin named 'nope'.*mgue"):
        check_plugin("estimators", "nope")
    assert check_plugin("estimator", "random").group == "estimators"
    assert check_plugin("anneal_geo.selectors", "topk").group == "selectors"


def test_report_lists_skips_and_notes():
    spectral = check_plugin("backbones", "spectral")
    assert "trainable" in spectral.skipped and "band subsets" in spectral.passed
    text = str(spectral)
    assert "spectral" in text and "skipped trainable" in text


def test_an_instance_is_checked_on_copies_and_options_reach_the_class():
    instance = MGUEEstimator(threshold="midpoint")
    check_estimator(instance)
    assert instance.threshold_ is None, "the kit fitted the caller's instance"
    with pytest.raises(ConformanceError, match=r"(?s)'instance'.*threshold must be one of"):
        check_estimator(MGUEEstimator, options={"threshold": "nope"})


# -- each check catches what it names ----------------------------------------------------------


def distances(embeddings, pairs):
    return np.linalg.norm(embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]], axis=1)


class WrongShape(Estimator):
    """One score too few."""

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)[1:]


class Asymmetric(Estimator):
    """Depends on which patch comes first."""

    def score(self, embeddings, pairs):
        return (embeddings[pairs[:, 0], 0] - embeddings[pairs[:, 1], 0]).astype(np.float64)


class DeclaredAsymmetric(Asymmetric):
    """Says so."""

    symmetric = False


class GlobalRandom(Estimator):
    """Ignores its seed."""

    def score(self, embeddings, pairs):
        return np.random.random(len(pairs))  # noqa: NPY002 - the bug under test


class NeedsBothClasses(Estimator):
    """Crashes unless it sees a similar pair."""

    def fit(self, embeddings, pairs, labels):
        self.tau = distances(embeddings, pairs)[labels == 1].max()

    def score(self, embeddings, pairs):
        return -np.abs(distances(embeddings, pairs) - getattr(self, "tau", 1.0))


class ScalesInPlace(Estimator):
    """Rescales the engine's embeddings in place."""

    def fit(self, embeddings, pairs, labels):
        embeddings *= 2.0

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class OtherNames(Estimator):
    """Renames the contract's arguments."""

    def score(self, emb, prs):
        return distances(emb, prs)


class RequiredExtra(Estimator):
    """Wants an argument the engine never passes."""

    def score(self, embeddings, pairs, scale):
        return distances(embeddings, pairs) * scale


class NoDocstring(Estimator):
    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class FutureContract(Estimator):
    """Written for a contract that does not exist yet."""

    contract_version = 2

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class TextCapability(Estimator):
    """A capability that is not a bool."""

    needs_labels = "yes"

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class RequiredOption(Estimator):
    """Cannot be built from a seed alone."""

    def __init__(self, seed, width):
        super().__init__(seed)

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class NotAnEstimator:
    """Forgot the base class."""

    def score(self, embeddings, pairs):
        return distances(embeddings, pairs)


class Unfinished(Estimator):
    """Forgot score()."""


class UniqueRowsOnly(Selector):
    """Loses rows whose descriptors repeat."""

    def select(self, descriptors, uncertainty, k, rng):
        _, first = np.unique(descriptors, axis=0, return_index=True)
        return np.sort(first)[:k]


class GlobalChoice(Selector):
    """Draws from numpy's global generator instead of rng."""

    def select(self, descriptors, uncertainty, k, rng):
        return np.random.choice(len(uncertainty), size=k, replace=False)  # noqa: NPY002


class NeverAll(Selector):
    """Always keeps one row back."""

    def select(self, descriptors, uncertainty, k, rng):
        return np.argsort(-uncertainty)[: min(k, len(uncertainty) - 1)]


class Pooled(nn.Module):
    """Standardised band means, then an optional tweak."""

    def __init__(self, mean, std, tweak=None, linear=False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("std", torch.tensor(std)[:, None, None])
        self.tweak = tweak
        self.linear = nn.Linear(len(mean), 8) if linear else None
        self.out_dim = 8 if linear else len(mean)

    def forward(self, x):
        z = ((x - self.mean) / self.std).mean(dim=(2, 3))
        z = self.linear(z) if self.linear is not None else z
        return self.tweak(z, x) if self.tweak is not None else z


def backbone(
    name, *, tweak=None, linear=False, trainable=False, refuse=False, crash=False, seeded=True
):
    """A small backbone class with one deliberate property."""

    def build(self, bands, mean, std):
        if crash and len(bands) != 13:
            raise KeyError(bands[0])
        if refuse and len(bands) != 13:
            raise DataError(f"this backbone needs all 13 bands, got {len(bands)}")
        if seeded:
            torch.manual_seed(self.seed)
        return Pooled(mean, std, tweak, linear)

    return type(
        name, (Backbone,), {"__doc__": "A test backbone.", "build": build, "trainable": trainable}
    )


class BadValue(Annotator):
    """Answers 2."""

    def annotate(self, pairs, pool):
        return (2 for _ in pairs)


class StopsEarly(Annotator):
    """Answers half the pairs, though no person is involved."""

    def annotate(self, pairs, pool):
        return (0 for _ in pairs[: len(pairs) // 2])


class CrashesWithoutLabels(Annotator):
    """Reads labels without checking they exist."""

    needs_labels = True

    def annotate(self, pairs, pool):
        hot = pool.labels
        return (int((hot[i] & hot[j]).any()) for i, j in pairs)


class Human(Annotator):
    """A person answers."""

    interactive = True

    def annotate(self, pairs, pool):
        raise AssertionError("the kit must not ask a person")


FAILURES = [
    (check_estimator, WrongShape, "fit and score", "shape"),
    (check_estimator, Asymmetric, "symmetric", "score(j, i)"),
    (check_estimator, GlobalRandom, "deterministic", "values differ"),
    (check_estimator, NeedsBothClasses, "fit on zero pairs", "ValueError"),
    (check_estimator, NeedsBothClasses, "fit on one class", "fit() raised"),
    (check_estimator, ScalesInPlace, "inputs unchanged", "modified the embeddings"),
    (check_estimator, OtherNames, "signatures", "'emb', the contract calls it 'embeddings'"),
    (check_estimator, RequiredExtra, "signatures", "required extra argument 'scale'"),
    (check_estimator, NoDocstring, "description", "no docstring"),
    (check_estimator, FutureContract, "contract version", "contract version 2"),
    (check_estimator, TextCapability, "capabilities", "needs_labels='yes'"),
    (check_estimator, RequiredOption, "constructor", "(seed=0) is not a valid call"),
    (check_estimator, NotAnEstimator, "subclass", "does not subclass"),
    (check_estimator, Unfinished, "implemented", "does not implement score"),
    (check_selector, UniqueRowsOnly, "identical descriptors", "shape (1,), expected (10)"),
    (check_selector, GlobalChoice, "only the given generator", "use rng only"),
    (check_selector, NeverAll, "k == M", "shape (39,), expected (40)"),
    (check_backbone, backbone("Float64", tweak=lambda z, x: z.double()), "forward", "float64"),
    (
        check_backbone,
        backbone("BatchNormalised", tweak=lambda z, x: z - z.mean(0)),
        "batch independence",
        "alone",
    ),
    (
        check_backbone,
        backbone("ShiftsInput", tweak=lambda z, x: z + x.sub_(1)[:, :, 0, 0]),
        "input unchanged",
        "modified its input",
    ),
    (check_backbone, backbone("Unseeded", linear=True, seeded=False), "deterministic", "seed"),
    (check_backbone, backbone("Frozen", trainable=True), "trainable", "no trainable parameters"),
    (check_backbone, backbone("CrashesOnSubsets", crash=True), "build", "KeyError"),
    (check_annotator, BadValue, "annotate", "answered 2"),
    (check_annotator, StopsEarly, "annotate", "must answer every pair"),
    (check_annotator, CrashesWithoutLabels, "unlabelled pool", "TypeError"),
]


@pytest.mark.parametrize(
    ("checker", "plugin", "check", "detail"),
    FAILURES,
    ids=[f"{plugin.__qualname__}-{check}" for _, plugin, check, _ in FAILURES],
)
def test_each_check_catches_its_violation(checker, plugin, check, detail):
    with pytest.raises(ConformanceError) as caught:
        checker(plugin)
    message = str(caught.value)
    first, *details = message.splitlines()
    assert plugin.__qualname__ in first, "the first line must name the plugin"
    assert f"'{check}'" in first
    line = next(d for d in details if d.startswith(f"  - {check}:"))
    assert detail in line, message


def test_declared_asymmetry_is_skipped_not_failed():
    report = check_estimator(DeclaredAsymmetric)
    assert "symmetric" in report.skipped and "deterministic" in report.passed


def test_a_refused_band_subset_is_a_note_not_a_failure():
    report = check_backbone(backbone("AllBandsOnly", refuse=True))
    assert "needs all 13 bands" in report.notes["build"]
    assert "RGB B04,B03,B02 refused" in report.notes["build"]


def test_interactive_annotators_are_never_driven():
    report = check_annotator(Human)
    assert {"annotate", "unlabelled pool"} <= set(report.skipped)


def test_a_registry_plugin_is_named_by_its_origin():
    class RegisteredWrongShape(WrongShape):
        """Registered in-process."""

    plugins.register(RegisteredWrongShape, name="kit-wrong-shape", group="estimators")
    try:
        with pytest.raises(ConformanceError, match=r"^estimator plugin 'kit-wrong-shape'"):
            check_plugin("estimators", "kit-wrong-shape")
    finally:
        plugins.unregister("kit-wrong-shape", "estimators")


# -- the data ----------------------------------------------------------------------------------


def test_the_sample_is_real_eurosat_with_class_structure():
    sample = load_sample()
    assert sample.embeddings.shape == (283, 26) and sample.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sample.embeddings, axis=1), 1.0, rtol=1e-5)
    assert not sample.embeddings.flags.writeable
    assert len(sample.class_names) == 10 and sample.sources[0].endswith(".tif")
    # Real signal: a patch's nearest neighbour usually shares its class (chance is ~10 %).
    sims = sample.embeddings @ sample.embeddings.T
    np.fill_diagonal(sims, -np.inf)
    assert np.mean(sample.labels[sims.argmax(1)] == sample.labels) > 0.5
    pool = sample.pool
    assert len(pool) == 30 and pool.patches.shape[1:] == (13, 16, 16)
    assert pool.patches.dtype == np.uint16 and pool.bands[-1] == "B8A"
    assert pool.class_counts() == dict.fromkeys(sample.class_names, 3)
    assert load_sample() is sample, "cached per process"


def test_pairs_of_the_sample_are_valid_and_labelled_correctly():
    sample = load_sample()
    pairs, labels = sample.labelled_pairs(similar=50, dissimilar=70, seed=3)
    assert pairs.shape == (120, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    same = sample.labels[pairs[:, 0]] == sample.labels[pairs[:, 1]]
    np.testing.assert_array_equal(labels, same.astype(np.int8))
    assert labels.sum() == 50
    cand = sample.candidate_pairs(500, exclude=pairs, seed=3)
    n = sample.embeddings.shape[0]
    assert not np.isin(cand[:, 0] * n + cand[:, 1], pairs[:, 0] * n + pairs[:, 1]).any()
    _, descriptors, u = sample.shortlist(40)
    assert descriptors.shape == (40, 52) and u.shape == (40,) and (u <= 0).all()


def test_shipped_sample_is_small_documented_and_reproducible_from_the_tiles():
    assert testing.SAMPLE_FILE.stat().st_size < 200_000
    readme = (testing.SAMPLE_FILE.parent / "README.md").read_text()
    for needle in ("EuroSAT", "MIT", "Helber", "write_sample_file"):
        assert needle in readme
    if not EUROSAT_MS.is_dir():
        pytest.skip("sample_tiles/eurosat_ms is not in this checkout")
    from anneal_geo.data.pool import PatchPool

    rebuilt = testing.sample_arrays(PatchPool.load(EUROSAT_MS))
    with np.load(testing.SAMPLE_FILE, allow_pickle=False) as shipped:
        assert set(shipped.files) == set(rebuilt)
        for name, value in rebuilt.items():
            np.testing.assert_array_equal(shipped[name], value, err_msg=name)


def test_importing_the_kit_imports_nothing_heavy():
    heavy = ("torch", "faiss", "rasterio", "geopandas", "torchgeo")
    probe = (
        f"import sys, anneal_geo.testing\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_real_session_runs_on_the_sample(tmp_path):
    records = testing.run_sample_session(tmp_path / "session", rounds=1)
    assert [r["round"] for r in records] == [0, 1]
    assert records[-1]["queried_pairs"] == 30
    assert 0.0 <= records[-1]["map@20"] <= 1.0


# -- a broken plugin distribution, really installed ------------------------------------------

BROKEN = Path(__file__).resolve().parent / "fixtures" / "broken_plugin"
CLI = Path(sys.executable).with_name("anneal-geo")


@pytest.fixture(scope="module")
def broken_target(tmp_path_factory, pip_install):
    target = tmp_path_factory.mktemp("site") / "broken"
    pip_install(BROKEN, target)
    assert (target / "anneal_geo_broken_fixture-0.0.1.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def broken(broken_target, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_target))
    plugins.refresh()
    yield broken_target
    for name in [m for m in sys.modules if m.startswith("anneal_geo_broken_fixture")]:
        del sys.modules[name]
    plugins.refresh()


def test_broken_plugins_are_reported_not_fatal(broken):
    report = {(i.group, i.name): i for i in plugins.inspect_all()}
    failed = report[("estimators", "broken-import")]
    assert failed.status == "broken"
    assert failed.distribution == "anneal-geo-broken-fixture" and failed.version == "0.0.1"
    assert (
        "ModuleNotFoundError" in failed.reason and "anneal_geo_no_such_dependency" in failed.reason
    )
    assert "anneal-geo-broken-fixture 0.0.1" in failed.reason
    # It loads: its breach of contract only shows when it is used.
    assert report[("estimators", "broken-shape")].status == "ok"
    assert all(report[key].status == "ok" for key in BUILTINS)


def test_the_wrong_shape_plugin_raises_a_plugin_error_naming_it(broken, tmp_path):
    sample = load_sample()
    estimator = plugins.create("estimators", "broken-shape")
    pattern = r"estimator plugin 'broken-shape'.*anneal-geo-broken-fixture 0\.0\.1.*shape \(4,\)"
    with pytest.raises(PluginError, match=pattern):
        estimator.checked_score(sample.embeddings, sample.candidate_pairs(5))
    # In a real session it stops the round with the same message, before any answer is lost.
    with pytest.raises(PluginError, match="broken-shape"):
        testing.run_sample_session(tmp_path / "session", estimator="broken-shape")


def test_the_kit_reports_both_broken_plugins(broken):
    with pytest.raises(ConformanceError, match=r"'load' check.*ModuleNotFoundError"):
        check_plugin("estimators", "broken-import")
    with pytest.raises(
        ConformanceError, match=r"^estimator plugin 'broken-shape'.*'fit and score'"
    ):
        check_plugin("estimators", "broken-shape")


def test_the_cli_lists_the_broken_plugin_and_keeps_working(broken_target):
    env = {**os.environ, "PYTHONPATH": str(broken_target)}
    listed = subprocess.run(
        [str(CLI), "plugins", "list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert re.search(
        r"broken-shape\s+estimators\s+\S+\s+anneal-geo-broken-fixture 0\.0\.1\s+ok", out
    )
    assert re.search(r"broken-import\s+estimators.*broken", out)
    assert "broken estimators/broken-import: estimator plugin 'broken-import'" in out
    assert "ModuleNotFoundError" in out and "Traceback" not in listed.stderr
    assert re.search(r"mgue\s+estimators.*anneal-geo 0\.1\.0\s+ok", out)
    checked = subprocess.run(
        [str(CLI), "plugins", "check", "broken-import"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert checked.returncode == 1 and "BROKEN" in checked.stdout
