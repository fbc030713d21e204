"""Tests of the diversity selectors (kmeans, topk, random) and the pair descriptors."""

from __future__ import annotations

import numpy as np
import pytest

from anneal_geo import plugins
from anneal_geo.errors import ConfigError, DataError, PluginError
from anneal_geo.selectors.base import Selector
from anneal_geo.selectors.descriptors import pair_descriptors
from anneal_geo.selectors.kmeans import KMeansSelector
from anneal_geo.selectors.random import RandomSelector
from anneal_geo.selectors.topk import TopKSelector


def _blobs(
    n_blobs: int = 5, per_blob: int = 20, dim: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs (centres 10 apart, spread 0.1) and each row's blob."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(n_blobs, dim)
    blob = np.repeat(np.arange(n_blobs), per_blob)
    points = centres[blob] + rng.normal(0.0, 0.1, (len(blob), dim))
    order = rng.permutation(len(blob))  # interleave the blobs in row order
    return points[order].astype(np.float32), blob[order]


# -- registration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("kmeans", KMeansSelector), ("topk", TopKSelector), ("random", RandomSelector)],
)
def test_entry_points_load_the_built_in_classes(name: str, cls: type) -> None:
    assert plugins.load("selectors", name) is cls
    selector = plugins.create("selectors", name, seed=1)
    desc, _ = _blobs()
    unc = np.random.default_rng(0).random(len(desc))
    idx = selector.checked_select(desc, unc, 7, np.random.default_rng(0))
    assert idx.shape == (7,) and idx.dtype == np.int64 and np.unique(idx).size == 7
    assert selector.checked_select(desc, unc, 0).shape == (0,)


# -- descriptors -------------------------------------------------------------------------


def test_pair_descriptors_values_and_symmetry() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10, 4)).astype(np.float32)
    pairs = np.array([[0, 1], [2, 7], [3, 9]], dtype=np.int64)
    desc = pair_descriptors(emb, pairs)
    assert desc.shape == (3, 8) and desc.dtype == np.float32 and desc.flags.c_contiguous
    np.testing.assert_allclose(desc[1, :4], emb[2] + emb[7], rtol=1e-6)
    np.testing.assert_allclose(desc[1, 4:], np.abs(emb[2] - emb[7]), rtol=1e-6)
    np.testing.assert_array_equal(desc, pair_descriptors(emb, pairs[:, ::-1]))


def test_pair_descriptors_reject_bad_input() -> None:
    emb = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(DataError, match=r"pair ids must lie in \[0, 4\)"):
        pair_descriptors(emb, np.array([[0, 4]]))
    with pytest.raises(DataError, match=r"pairs must be an \(M, 2\) integer array"):
        pair_descriptors(emb, np.array([[0.0, 1.0]]))
    with pytest.raises(DataError, match=r"embeddings must be \(N, D\)"):
        pair_descriptors(np.zeros(4), np.array([[0, 1]]))


# -- kmeans ------------------------------------------------------------------------------


def test_kmeans_takes_the_most_uncertain_pair_of_each_blob() -> None:
    desc, blob = _blobs()
    unc = np.random.default_rng(1).random(len(desc))
    idx = KMeansSelector(seed=0).checked_select(desc, unc, 5, np.random.default_rng(0))
    assert sorted(blob[idx]) == [0, 1, 2, 3, 4]  # one pick per blob
    for i in idx:
        members = np.flatnonzero(blob == blob[i])
        assert unc[i] == unc[members].max()
    assert list(idx) == sorted(idx, key=lambda i: -unc[i])  # most uncertain first


def test_kmeans_centroid_pick_takes_the_member_nearest_each_blob_mean() -> None:
    desc, blob = _blobs(seed=3)
    unc = np.random.default_rng(3).random(len(desc))
    idx = KMeansSelector(pick="centroid").checked_select(desc, unc, 5, np.random.default_rng(0))
    assert sorted(blob[idx]) == [0, 1, 2, 3, 4]
    for i in idx:
        members = np.flatnonzero(blob == blob[i])
        gaps = np.linalg.norm(desc[members] - desc[members].mean(axis=0), axis=1)
        assert i == members[np.argmin(gaps)]


def test_kmeans_is_more_diverse_than_topk() -> None:
    desc, blob = _blobs()
    # The 20 most uncertain rows all sit in blob 0.
    unc = np.where(blob == 0, 1.0, 0.0) + np.random.default_rng(0).random(len(desc)) * 0.1
    top = TopKSelector().checked_select(desc, unc, 5)
    diverse = KMeansSelector().checked_select(desc, unc, 5, np.random.default_rng(0))
    assert set(blob[top]) == {0}
    assert set(blob[diverse]) == {0, 1, 2, 3, 4}


def test_kmeans_fills_slots_when_clusters_are_fewer_than_k() -> None:
    # Ten identical descriptors: one non-empty cluster at most, whatever k-means does.
    desc = np.ones((10, 4), dtype=np.float32)
    unc = np.random.default_rng(2).random(10)
    idx = KMeansSelector().checked_select(desc, unc, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, np.argsort(-unc)[:4])
    # Three distinct points, six slots: still six distinct rows, every point represented.
    desc3 = np.repeat(np.eye(3, 4, dtype=np.float32) * 5, 4, axis=0)
    unc3 = np.random.default_rng(3).random(12)
    idx3 = KMeansSelector().checked_select(desc3, unc3, 6, np.random.default_rng(0))
    assert np.unique(idx3).size == 6
    assert set(idx3 // 4) == {0, 1, 2}


def test_kmeans_returns_all_rows_when_k_is_m() -> None:
    desc, _ = _blobs(n_blobs=2, per_blob=3)
    unc = np.arange(6, dtype=np.float64)
    idx = KMeansSelector().checked_select(desc, unc, 6, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, [5, 4, 3, 2, 1, 0])


def test_kmeans_is_deterministic_given_the_generator() -> None:
    desc = np.random.default_rng(4).standard_normal((300, 16)).astype(np.float32)
    unc = np.random.default_rng(5).random(300)
    selector = KMeansSelector()
    a = selector.checked_select(desc, unc, 30, np.random.default_rng(7))
    b = selector.checked_select(desc, unc, 30, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    # Without a generator the selector's own seed is used, also reproducibly.
    np.testing.assert_array_equal(
        KMeansSelector(seed=9).checked_select(desc, unc, 30),
        KMeansSelector(seed=9).checked_select(desc, unc, 30),
    )


def test_kmeans_does_not_print_the_faiss_small_sample_warning(
    capfd: pytest.CaptureFixture[str],
) -> None:
    desc, _ = _blobs()  # 100 points for 10 clusters: far below faiss's 39 per centroid
    KMeansSelector().checked_select(desc, np.zeros(100), 10, np.random.default_rng(0))
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err + captured.out


def test_kmeans_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"pick must be one of uncertain, centroid, got 'far'"):
        KMeansSelector(pick="far")
    with pytest.raises(ConfigError, match="niter must be >= 1"):
        KMeansSelector(niter=0)


# -- topk and random ---------------------------------------------------------------------


def test_topk_takes_the_most_uncertain_with_ties_by_index() -> None:
    unc = np.array([0.1, 0.9, 0.5, 0.9, 0.3, 0.5])
    desc = np.zeros((6, 2), dtype=np.float32)
    np.testing.assert_array_equal(TopKSelector().checked_select(desc, unc, 4), [1, 3, 2, 5])
    rng = np.random.default_rng(0)
    big = rng.random(1000)
    idx = TopKSelector().checked_select(np.zeros((1000, 2), dtype=np.float32), big, 50)
    assert set(idx) == set(np.argsort(big)[-50:])


def test_random_selector_is_distinct_and_reproducible() -> None:
    desc = np.zeros((100, 2), dtype=np.float32)
    unc = np.zeros(100)
    selector = RandomSelector()
    a = selector.checked_select(desc, unc, 40, np.random.default_rng(11))
    b = selector.checked_select(desc, unc, 40, np.random.default_rng(11))
    c = selector.checked_select(desc, unc, 40, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.unique(a).size == 40 and a.min() >= 0 and a.max() < 100
    assert sorted(selector.checked_select(desc, unc, 100, np.random.default_rng(0))) == list(
        range(100)
    )


class _Repeats(Selector):
    def select(
        self, descriptors: np.ndarray, uncertainty: np.ndarray, k: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.zeros(k, dtype=np.int64)


def test_base_class_rejects_repeated_indices() -> None:
    with pytest.raises(PluginError, match="repeated indices"):
        _Repeats().checked_select(np.zeros((5, 2), dtype=np.float32), np.zeros(5), 3)
