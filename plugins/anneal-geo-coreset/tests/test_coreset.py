"""The core-set selector: the conformance kit, coverage on real EuroSAT-MS pair descriptors, and
a real ANNEAL session through the engine."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from anneal_geo_coreset import CoresetSelector, covering_radius, k_center_greedy

from anneal_geo.errors import ConfigError
from anneal_geo.selectors.random import RandomSelector
from anneal_geo.selectors.topk import TopKSelector
from anneal_geo.testing import (
    check_plugin,
    check_selector,
    load_sample,
    plugin_cases,
    run_sample_session,
)


@pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="anneal-geo-coreset"))
def test_the_installed_plugin_passes_the_conformance_kit(group, name):
    report = check_plugin(group, name)
    assert {"identical descriptors", "only the given generator", "k == M"} <= set(report.passed)


@pytest.mark.parametrize(
    "options", [{"weight": 0.0}, {"weight": 1.0}, {"start": "random"}], ids=str
)
def test_every_setting_passes_the_conformance_kit(options):
    check_selector(CoresetSelector, options=options)


@pytest.fixture(scope="module")
def shortlist():
    _, descriptors, uncertainty = load_sample().shortlist(200, seed=2)
    return descriptors, uncertainty


def select(selector, descriptors, uncertainty, k, seed=0):
    return selector.checked_select(descriptors, uncertainty, k, np.random.default_rng(seed))


def test_the_core_set_covers_the_short_list_better_than_top_k_or_random(shortlist):
    descriptors = shortlist[0]
    core = covering_radius(descriptors, select(CoresetSelector(weight=0.0), *shortlist, 20))
    top = covering_radius(descriptors, select(TopKSelector(), *shortlist, 20))
    random_radii = [
        covering_radius(descriptors, select(RandomSelector(), *shortlist, 20, seed))
        for seed in range(10)
    ]
    assert core < top
    assert core < min(random_radii)


def test_greedy_is_within_twice_the_optimal_covering_radius(shortlist):
    descriptors = shortlist[0][:14]
    k = 3
    optimum = min(covering_radius(descriptors, list(c)) for c in combinations(range(14), k))
    greedy = covering_radius(descriptors, k_center_greedy(descriptors, k, first=0))
    assert optimum <= greedy <= 2 * optimum + 1e-9


def test_the_weight_trades_coverage_for_uncertainty(shortlist):
    descriptors, uncertainty = shortlist
    plain = select(CoresetSelector(weight=0.0), *shortlist, 20)
    weighted = select(CoresetSelector(weight=1.0), *shortlist, 20)
    assert uncertainty[weighted].mean() > uncertainty[plain].mean()
    assert covering_radius(descriptors, plain) <= covering_radius(descriptors, weighted)


def test_picks_come_most_uncertain_first_and_start_at_the_most_uncertain(shortlist):
    uncertainty = shortlist[1]
    picked = select(CoresetSelector(), *shortlist, 20)
    assert np.all(np.diff(uncertainty[picked]) <= 0)
    assert picked[0] == int(np.argmax(uncertainty))


def test_duplicates_still_give_k_distinct_rows(shortlist):
    descriptors, uncertainty = shortlist
    twins = np.repeat(descriptors[:3], 10, axis=0)
    picked = select(CoresetSelector(), twins, uncertainty[:30], 12)
    assert len(set(picked.tolist())) == 12
    # The three distinct descriptors are covered first.
    assert covering_radius(twins, picked) == 0.0


def test_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match=r"weight must lie in \[0, 1\]"):
        CoresetSelector(weight=1.5)
    with pytest.raises(ConfigError, match="weight must be a number"):
        CoresetSelector(weight="much")
    with pytest.raises(ConfigError, match="start must be one of uncertain, random"):
        CoresetSelector(start="centre")


def test_a_real_session_with_the_core_set(tmp_path):
    records = run_sample_session(
        tmp_path / "session", rounds=2, selector="coreset", selector_options={"weight": 0.25}
    )
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["selector"] == "coreset" for r in records)
    assert records[-1]["queried_pairs"] == 40
    assert 0.0 <= records[-1]["map@20"] <= 1.0
