"""Candidate generation at scale: the approximate (IVF) k-NN graph, its switch-over from the
exact one, and the fast key helpers, checked against exact search and numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from anneal_geo.errors import ConfigError
from anneal_geo.pairs.candidates import (
    EXACT_KNN_MAX_PATCHES,
    KNN_METHODS,
    candidate_blocks,
    in_sorted,
    ivf_cells,
    knn_candidates,
    pair_keys,
    suggested_knn_k,
    unique_sorted,
)


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Points around random unit centres, each cluster stretched along 4 random directions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((clusters, 4, dim)) * 0.2
    c = rng.integers(0, clusters, n)
    x = centres[c] + np.einsum("nl,nld->nd", rng.standard_normal((n, 4)), basis[c])
    x += 0.02 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in pairs}


def test_unique_sorted_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 2, 1000):
        values = rng.integers(-50, 50, size)
        got = unique_sorted(values)
        assert got.tolist() == np.unique(values).tolist() and got.dtype == values.dtype
    assert unique_sorted(np.array([[3, 1], [1, 3]])).tolist() == [1, 3]


def test_suggested_k_keeps_the_edge_count_bounded() -> None:
    assert suggested_knn_k(1_500) == 50
    assert suggested_knn_k(200_000) == 50
    assert suggested_knn_k(500_000) == 20
    assert suggested_knn_k(1_000_000) == 10
    assert suggested_knn_k(50_000_000) == 10  # never below the floor
    assert suggested_knn_k(0) == 50
    sizes = np.array([300_000, 400_000, 700_000, 1_000_000])
    assert all(n * suggested_knn_k(int(n)) <= 10_000_000 for n in sizes)


def test_ivf_cells_probe_the_nearest_cells() -> None:
    x = clustered(5_000)
    cells, probe, dist = ivf_cells(x, list_size=100, probes=3)
    assert 30 <= cells.shape[0] <= 70  # about 5,000 / 100
    assert probe.shape == dist.shape == (5_000, 3)
    assert (probe >= 0).all() and (probe < cells.shape[0]).all()
    assert (np.diff(dist, axis=1) >= 0).all()  # nearest first
    assert (probe[:, 0] != probe[:, 1]).all()
    # The recorded squared distances are the distances to those cells.
    sample = np.arange(0, 5_000, 97)
    want = ((x[sample, None, :] - cells[probe[sample]]) ** 2).sum(-1)
    np.testing.assert_allclose(dist[sample], want, rtol=1e-4, atol=1e-5)
    # The first probe is the nearest cell for almost every point (the search is confined to
    # the cells of a point's nearest top-level cells, so a rare miss is allowed).
    _, exact = faiss.knn(x, cells, 1)
    assert np.mean(exact[:, 0] == probe[:, 0]) > 0.95
    # Fewer cells than probes: every point probes every cell, nearest first, none is -1.
    few_cells, few, few_dist = ivf_cells(x[:150], list_size=100, probes=3)
    assert few_cells.shape[0] == 2 and few.shape == (150, 2)
    assert (np.sort(few, axis=1) == [0, 1]).all() and np.isfinite(few_dist).all()


def test_ivf_cells_do_not_depend_on_the_block_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # The best probes are picked a block of rows at a time; blocks of 701 rows (the last
    # one short) must give what one block of all 5,000 gives.
    from anneal_geo.pairs import candidates

    x = clustered(5_000)
    whole = ivf_cells(x, list_size=100, probes=3)
    monkeypatch.setattr(candidates, "_KNN_QUERY_CHUNK", 701)
    blocked = ivf_cells(x, list_size=100, probes=3)
    for a, b in zip(whole, blocked, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert blocked[1].dtype == np.int64  # what faiss's search_preassigned takes


def test_ivf_graph_is_exact_when_every_cell_is_probed(eurosat_embeddings: np.ndarray) -> None:
    # 283 patches make 2 cells of ~128 and every point probes both: the IVF search is then
    # exhaustive, and only float16 storage could reorder near-ties.
    emb = eurosat_embeddings
    ids = np.arange(emb.shape[0])
    exact = as_set(knn_candidates(emb, ids, k=8, far_fraction=0.0, method="exact"))
    stats: dict = {}
    ivf = as_set(knn_candidates(emb, ids, k=8, far_fraction=0.0, method="ivf", stats=stats))
    assert stats["knn_method"] == "ivf"
    assert len(exact ^ ivf) <= 0.01 * len(exact)


def test_ivf_graph_finds_most_true_neighbours() -> None:
    n, k = 30_000, 10
    x = clustered(n)
    ids = np.arange(n)
    stats: dict = {}
    pairs = knn_candidates(x, ids, k=k, far_fraction=0.0, method="auto", stats=stats)
    assert stats["knn_method"] == "ivf"  # above EXACT_KNN_MAX_PATCHES
    assert (pairs[:, 0] < pairs[:, 1]).all()
    keys = pair_keys(pairs, n)
    assert (np.diff(keys) > 0).all()  # sorted, unique
    # Each point keeps k partners, like the exact graph: between k and 2k edges per point.
    assert n * k / 2 <= pairs.shape[0] <= n * k
    queries = np.random.default_rng(1).choice(n, 500, replace=False)
    _, true = faiss.knn(x[queries], x, k + 1)
    want = np.array(
        [[min(q, j), max(q, j)] for q, row in zip(queries, true, strict=True) for j in row
         if j != q]
    )
    recall = in_sorted(pair_keys(want, n), keys).mean()
    assert recall > 0.8, recall
    # A function of the embeddings: the same graph again, whatever rng the far pairs use.
    again = knn_candidates(x, ids, k=k, far_fraction=0.0, rng=99, method="ivf")
    assert np.array_equal(again, pairs)


def test_auto_switches_to_ivf_above_the_threshold() -> None:
    n = EXACT_KNN_MAX_PATCHES + 1
    x = clustered(n, dim=8, clusters=5)
    small: dict = {}
    large: dict = {}
    knn_candidates(x, np.arange(n - 1), k=3, far_fraction=0.0, stats=small)
    got = knn_candidates(x, np.arange(n), k=3, far_fraction=0.1, rng=4, stats=large)
    assert small["knn_method"] == "exact" and large["knn_method"] == "ivf"
    assert large["far_pairs"] == round(0.1 * large["knn_edges"])
    assert got.shape[0] == large["knn_edges"] + large["far_pairs"]
    assert large["seconds_neighbours"] > 0 and "seconds_far" in large


def test_ivf_respects_ids_and_exclusions(eurosat_embeddings: np.ndarray) -> None:
    emb = eurosat_embeddings
    ids = np.arange(1, emb.shape[0], 2)  # a subset: ids are mapped back from rows
    edges = knn_candidates(emb, ids, k=5, far_fraction=0.0, method="ivf")
    assert np.isin(edges, ids).all()
    exclude = edges[::4][:, ::-1]  # either row order
    kept = knn_candidates(emb, ids, k=5, far_fraction=0.5, exclude=exclude, rng=2, method="ivf")
    excluded = {(min(a, b), max(a, b)) for a, b in exclude.tolist()}
    assert not as_set(kept) & excluded
    assert as_set(edges) - excluded <= as_set(kept)
    stats: dict = {}
    blocks = list(
        candidate_blocks("knn", emb, ids, exclude, 2, k=5, far_fraction=0.5, block_size=50,
                         knn_method="ivf", stats=stats)
    )
    assert np.concatenate(blocks).tolist() == kept.tolist()
    assert stats["knn_method"] == "ivf"
    assert stats["knn_edges"] + stats["far_pairs"] == kept.shape[0]


def test_unknown_knn_method_is_a_config_error(eurosat_embeddings: np.ndarray) -> None:
    assert KNN_METHODS == ("auto", "exact", "ivf")
    with pytest.raises(ConfigError, match=r"'hnsw'.*auto, exact, ivf"):
        knn_candidates(eurosat_embeddings, np.arange(10), k=3, method="hnsw")


def test_engine_selects_from_the_ivf_graph() -> None:
    from anneal_geo.engine import select_pairs
    from anneal_geo.estimators.mgue import MGUEEstimator
    from anneal_geo.selectors.kmeans import KMeansSelector

    n = EXACT_KNN_MAX_PATCHES + 5_000
    x = clustered(n, clusters=8)
    cluster = np.argmax(x @ x[:200].T, axis=1)  # stand-in labels: nearest of 200 anchors
    rng = np.random.default_rng(0)
    labelled = np.sort(rng.choice(n, size=(300, 2)), axis=1)
    labelled = labelled[labelled[:, 0] != labelled[:, 1]]
    estimator = MGUEEstimator()
    estimator.checked_fit(
        x, labelled, (cluster[labelled[:, 0]] == cluster[labelled[:, 1]]).astype(np.int8)
    )
    pairs, stats = select_pairs(
        x, np.arange(n), labelled, estimator, KMeansSelector(seed=0), 40,
        np.random.default_rng(1), knn_k=10,
    )
    assert stats["candidates"] == "knn" and stats["shortlist"] == 400
    assert pairs.shape == (40, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    assert not in_sorted(pair_keys(pairs, n), np.sort(pair_keys(labelled, n))).any()
    assert np.unique(pair_keys(pairs, n)).size == 40
