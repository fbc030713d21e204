"""The committee estimator: the conformance kit, committee behaviour on real EuroSAT-MS
embeddings, and a real ANNEAL session through the engine."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from anneal_geo_committee import CommitteeEstimator, vote_entropy

from anneal_geo.errors import ConfigError
from anneal_geo.estimators.mgue import pair_distances
from anneal_geo.testing import (
    check_estimator,
    check_plugin,
    load_sample,
    plugin_cases,
    run_sample_session,
)


@pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="anneal-geo-committee"))
def test_the_installed_plugin_passes_the_conformance_kit(group, name):
    report = check_plugin(group, name)
    assert {"symmetric", "deterministic", "fit on one class"} <= set(report.passed)


@pytest.mark.parametrize(
    "options",
    [
        {"member": "threshold", "disagreement": "variance"},
        {"member": "logistic"},
        {"member": "logistic", "disagreement": "variance", "members": 4},
        {"member": "tree"},
    ],
    ids=["threshold-variance", "logistic", "logistic-variance", "tree"],
)
def test_every_member_kind_passes_the_conformance_kit(options):
    if options["member"] == "tree":
        pytest.importorskip("sklearn")
    check_estimator(CommitteeEstimator, options=options)


@pytest.fixture(scope="module")
def data():
    sample = load_sample()
    pairs, labels = sample.labelled_pairs(similar=120, dissimilar=280, seed=1)
    candidates = sample.candidate_pairs(3000, exclude=pairs, seed=1)
    return sample.embeddings, pairs, labels, candidates, sample.labels


def test_vote_entropy_is_zero_on_agreement_and_ln2_on_an_even_split():
    votes = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    h = vote_entropy(votes)
    np.testing.assert_allclose(h[:3], [0.0, 0.0, np.log(2)])
    assert 0 < h[3] < np.log(2)


def test_pairs_between_the_members_thresholds_are_the_uncertain_ones(data):
    emb, pairs, labels, candidates, _ = data
    est = CommitteeEstimator(seed=0)
    est.fit(emb, pairs, labels)
    taus = est.thresholds_
    assert taus is not None and taus.shape == (15,) and taus.std() > 0
    d = pair_distances(emb, candidates)
    u = est.score(emb, candidates)
    inside = (d > taus.min()) & (d < taus.max())
    assert inside.any() and (~inside).any()
    # Every pair the committee splits on outranks every pair it agrees on.
    assert u[inside].min() > u[~inside].max()
    # Among agreed pairs, the nearer the boundary, the more uncertain (the tie-break).
    below = d <= taus.min()
    order = np.argsort(d[below])
    assert np.all(np.diff(u[below][order]) >= 0)


def test_more_answers_narrow_the_band_of_disagreement(data):
    emb, pairs, labels, candidates, _ = data
    share = {}
    for member in ("threshold", "logistic"):
        for count in (40, 400):
            est = CommitteeEstimator(seed=0, member=member)
            est.fit(emb, pairs[:count], labels[:count])
            votes = est.margins(emb, candidates) > 0
            share[member, count] = float(np.mean(votes.any(axis=1) & ~votes.all(axis=1)))
    assert share["threshold", 400] < share["threshold", 40]
    assert share["logistic", 400] < share["logistic", 40]


@pytest.mark.parametrize("member", ["threshold", "logistic"])
def test_the_committee_vote_separates_real_classes(data, member):
    emb, pairs, labels, candidates, classes = data
    est = CommitteeEstimator(seed=0, member=member)
    est.fit(emb, pairs, labels)
    similar = est.margins(emb, candidates).mean(axis=1) > 0
    truth = classes[candidates[:, 0]] == classes[candidates[:, 1]]
    balanced = 0.5 * (similar[truth].mean() + (~similar[~truth]).mean())
    assert balanced > 0.65, f"balanced accuracy {balanced:.3f} (chance is 0.5)"


def test_the_seed_drives_the_resamples(data):
    emb, pairs, labels, _, _ = data
    fits = []
    for seed in (0, 0, 1):
        est = CommitteeEstimator(seed=seed)
        est.fit(emb, pairs, labels)
        fits.append(est.thresholds_)
    np.testing.assert_array_equal(fits[0], fits[1])
    assert not np.array_equal(fits[0], fits[2])


def test_one_class_and_no_labels_fall_back_with_a_reason(data):
    emb, pairs, labels, candidates, _ = data
    est = CommitteeEstimator(member="logistic")
    est.fit(emb, pairs[labels == 0], labels[labels == 0])
    assert "one class only" in est.fallback_reason and est.thresholds_ is not None
    est.fit(emb, pairs[:0], labels[:0])
    assert "no labelled pairs" in est.fallback_reason
    u = est.score(emb, candidates)
    d = pair_distances(emb, candidates)
    np.testing.assert_allclose(u, -np.abs(d - np.median(d)))


def test_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match="members must be >= 2"):
        CommitteeEstimator(members=1)
    with pytest.raises(ConfigError, match="member must be one of threshold, logistic, tree"):
        CommitteeEstimator(member="forest")
    with pytest.raises(ConfigError, match="disagreement must be one of"):
        CommitteeEstimator(disagreement="bald")


def test_tree_members_without_scikit_learn_say_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.delitem(sys.modules, "sklearn.tree", raising=False)
    with pytest.raises(ConfigError, match=r"anneal-geo-committee\[trees\]"):
        CommitteeEstimator(member="tree")


def test_a_real_session_with_the_committee(tmp_path):
    records = run_sample_session(
        tmp_path / "session", rounds=2, estimator="committee", estimator_options={"members": 9}
    )
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["estimator"] == "committee" for r in records)
    assert records[-1]["queried_pairs"] == 40
    assert 0.0 <= records[-1]["map@20"] <= 1.0
