"""Ranking metrics: hand-computed cases and an independent check against scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from sklearn.metrics import average_precision_score

from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval.index import rank_all
from anneal_geo.retrieval.metrics import (
    average_precision,
    count_unscorable,
    map_at_r,
    mean_average_precision,
    mean_over_queries,
    precision_at_k,
    r_precision,
)
from anneal_geo.retrieval.split import stratified_split

EUROSAT_MS = Path(__file__).resolve().parents[1] / "sample_tiles" / "eurosat_ms"


def _eurosat_features() -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of every EuroSAT-MS GeoTIFF, L2-normalised, and class ids."""
    classes = sorted(p.name for p in EUROSAT_MS.iterdir() if p.is_dir())
    features, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((EUROSAT_MS / name).glob("*.tif")):
            with rasterio.open(path) as src:
                pixels = src.read().astype(np.float64)
            features.append(np.concatenate([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))]))
            labels.append(index)
    feats = np.asarray(features)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), np.asarray(labels, dtype=np.int64)


@pytest.fixture(scope="module")
def real_ranking() -> dict[str, np.ndarray]:
    """Full rankings of the EuroSAT-MS archive for held-out queries (80/20 split)."""
    feats, labels = _eurosat_features()
    archive, queries = stratified_split(labels, 0.2, seed=0)
    distances, order = rank_all(feats[archive], feats[queries])
    relevant = labels[queries][:, None] == labels[archive][None, :]
    return {
        "distances": distances,
        "order": order,
        "ranked": np.take_along_axis(relevant, order, axis=1),
        "n_relevant": relevant.sum(axis=1),
    }


# -- hand-made rankings -------------------------------------------------------------------


def test_average_precision_hand_cases() -> None:
    relevance = np.array(
        [
            [1, 0, 1, 0],  # 2 relevant, both ranked: (1 + 2/3) / 2
            [0, 1, 1, 0],  # 3 relevant, one missed: (1/2 + 2/3) / 3
            [1, 1, 0, 0],  # perfect
            [0, 0, 0, 1],  # 1 relevant at rank 4: 1/4
        ],
        dtype=bool,
    )
    n_relevant = np.array([2, 3, 2, 1])
    ap = average_precision(relevance, n_relevant)
    expected = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 3, 1.0, 1 / 4]
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-12)
    assert mean_average_precision(relevance, n_relevant) == pytest.approx(np.mean(expected))


def test_average_precision_at_k_is_normalised_by_min_k_and_relevant() -> None:
    relevance = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=bool)
    n_relevant = np.array([5, 2])
    ap3 = average_precision(relevance, n_relevant, k=3)
    # query 0: hits at ranks 2 and 3 out of min(3, 5) = 3 possible; query 1: perfect top 2.
    np.testing.assert_allclose(ap3, [(1 / 2 + 2 / 3) / 3, 1.0], atol=1e-12)
    ap1 = average_precision(relevance, n_relevant, k=1)
    np.testing.assert_allclose(ap1, [0.0, 1.0], atol=1e-12)


def test_k_beyond_a_complete_ranking_is_allowed_but_not_beyond_a_truncated_one() -> None:
    relevance = np.array([[1, 0, 1]], dtype=bool)
    # An archive of 3 items ranked completely: AP@20 equals the full AP.
    assert average_precision(relevance, np.array([2]), k=20)[0] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ConfigError, match="rank more"):
        average_precision(relevance, np.array([5]), k=20)
    with pytest.raises(ConfigError, match="k=0"):
        average_precision(relevance, np.array([2]), k=0)


def test_precision_at_k_hand_case() -> None:
    relevance = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)
    n_relevant = np.array([3, 4])
    np.testing.assert_allclose(precision_at_k(relevance, n_relevant, 2), [0.5, 0.0])
    np.testing.assert_allclose(precision_at_k(relevance, n_relevant, 5), [0.6, 0.2])
    with pytest.raises(ConfigError, match="exceeds"):
        precision_at_k(relevance, n_relevant, 6)


def test_map_at_r_and_r_precision_hand_case() -> None:
    relevance = np.array(
        [
            [1, 0, 1, 1, 0],  # R = 3: P@1 = 1, rank 3 -> 2/3; rank 4 lies beyond R
            [0, 1, 0, 0, 0],  # R = 1: nothing at rank 1
            [1, 1, 0, 0, 0],  # R = 2: perfect
        ],
        dtype=bool,
    )
    n_relevant = np.array([3, 1, 2])
    np.testing.assert_allclose(map_at_r(relevance, n_relevant), [(1 + 2 / 3) / 3, 0.0, 1.0])
    np.testing.assert_allclose(r_precision(relevance, n_relevant), [2 / 3, 0.0, 1.0])
    with pytest.raises(ConfigError, match="rank the whole archive"):
        map_at_r(relevance, np.array([6, 1, 2]))


def test_queries_without_relevant_items_are_left_out_and_counted() -> None:
    relevance = np.array([[1, 0], [0, 0], [0, 1]], dtype=bool)
    n_relevant = np.array([1, 0, 1])
    ap = average_precision(relevance, n_relevant)
    assert np.isnan(ap[1])
    assert mean_over_queries(ap) == pytest.approx((1 + 0.5) / 2)
    assert mean_average_precision(relevance, n_relevant) == pytest.approx(0.75)
    assert np.isnan(precision_at_k(relevance, n_relevant, 1)[1])
    assert np.isnan(map_at_r(relevance, n_relevant)[1])
    assert count_unscorable(n_relevant) == 1
    assert np.isnan(mean_average_precision(relevance[1:2], n_relevant[1:2]))


def test_inconsistent_inputs_are_rejected() -> None:
    with pytest.raises(DataError, match="smaller than"):
        average_precision(np.array([[1, 1, 0]], dtype=bool), np.array([1]))
    with pytest.raises(DataError, match="one count per query"):
        average_precision(np.array([[1, 0]], dtype=bool), np.array([1, 1]))
    with pytest.raises(DataError, match="matrix"):
        average_precision(np.array([1, 0], dtype=bool), np.array([1]))
    with pytest.raises(DataError, match="0/1"):
        average_precision(np.array([[2, 0]]), np.array([1]))


# -- real rankings ------------------------------------------------------------------------


def test_full_map_matches_sklearn_on_real_eurosat_rankings(
    real_ranking: dict[str, np.ndarray],
) -> None:
    distances, ranked = real_ranking["distances"], real_ranking["ranked"]
    n_relevant = real_ranking["n_relevant"]
    # sklearn groups tied scores; compare only queries whose distances are all distinct.
    tie_free = (np.diff(distances, axis=1) > 0).all(axis=1)
    assert tie_free.sum() >= 0.9 * len(tie_free)
    ours = average_precision(ranked, n_relevant)
    theirs = np.array(
        [
            average_precision_score(ranked[q], -distances[q].astype(np.float64))
            for q in np.flatnonzero(tie_free)
        ]
    )
    np.testing.assert_allclose(ours[tie_free], theirs, rtol=0, atol=1e-6)
    assert mean_average_precision(ranked[tie_free], n_relevant[tie_free]) == pytest.approx(
        theirs.mean(), abs=1e-6
    )
    # Real features retrieve far better than chance: the sanity of the whole chain.
    assert theirs.mean() > 2 * n_relevant.mean() / ranked.shape[1]


def test_precision_and_r_precision_match_direct_counts_on_real_rankings(
    real_ranking: dict[str, np.ndarray],
) -> None:
    ranked, n_relevant = real_ranking["ranked"], real_ranking["n_relevant"]
    for k in (1, 10, 20, 50):
        direct = [sum(bool(x) for x in row[:k]) / k for row in ranked.tolist()]
        np.testing.assert_allclose(precision_at_k(ranked, n_relevant, k), direct, atol=1e-12)
    direct_rp = [
        sum(bool(x) for x in row[:r]) / r
        for row, r in zip(ranked.tolist(), n_relevant.tolist(), strict=True)
    ]
    np.testing.assert_allclose(r_precision(ranked, n_relevant), direct_rp, atol=1e-12)


def test_map_at_r_matches_a_loop_on_real_rankings(real_ranking: dict[str, np.ndarray]) -> None:
    ranked, n_relevant = real_ranking["ranked"], real_ranking["n_relevant"]
    expected = []
    for row, r in zip(ranked.tolist(), n_relevant.tolist(), strict=True):
        hits, total = 0, 0.0
        for rank, rel in enumerate(row[:r], start=1):
            if rel:
                hits += 1
                total += hits / rank
        expected.append(total / r)
    np.testing.assert_allclose(map_at_r(ranked, n_relevant), expected, atol=1e-12)
    # Each P@i <= 1, so MAP@R is at most R-precision.
    assert (map_at_r(ranked, n_relevant) <= r_precision(ranked, n_relevant) + 1e-12).all()
