"""Candidate generation: exhaustive blocks and the faiss k-NN graph, checked by brute force."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from anneal_geo.errors import ConfigError
from anneal_geo.pairs.candidates import (
    EXHAUSTIVE_MAX_PATCHES,
    MODES,
    candidate_blocks,
    count_exhaustive,
    default_mode,
    exhaustive_blocks,
    in_sorted,
    knn_candidates,
    pair_keys,
    sorted_keys,
    triu_pairs,
)


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in pairs}


def test_keys_and_membership() -> None:
    pairs = np.array([[0, 1], [2, 5], [3, 4]])
    assert pair_keys(pairs, 10).tolist() == [1, 25, 34]
    assert pair_keys(pairs, 10).dtype == np.int64
    excluded = sorted_keys(np.array([[5, 2], [0, 9]]), 10)  # row order ignored
    assert excluded.tolist() == [9, 25]
    assert in_sorted(pair_keys(pairs, 10), excluded).tolist() == [False, True, False]
    assert in_sorted(np.array([99]), excluded).tolist() == [False]
    assert in_sorted(np.array([1, 2]), sorted_keys(None, 10)).tolist() == [False, False]
    with pytest.raises(ValueError):
        sorted_keys(np.array([[0, 12]]), 10)


def test_triu_pairs_matches_numpy() -> None:
    for m in range(1, 12):
        r, c = np.triu_indices(m, 1)
        got_r, got_c = triu_pairs(m, np.arange(r.size))
        assert got_r.tolist() == r.tolist() and got_c.tolist() == c.tolist()


def test_exhaustive_blocks_cover_all_pairs_minus_excluded() -> None:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(200, size=60, replace=False))
    every = list(itertools.combinations(ids.tolist(), 2))
    pick = rng.choice(len(every), size=150, replace=False)
    exclude = np.array([every[p] for p in pick])
    exclude[::2] = exclude[::2, ::-1]  # excluded pairs in either order
    exclude = np.concatenate((exclude, [[199, 250], [1000, 3]]))  # pairs outside ids are fine
    blocks = list(exhaustive_blocks(ids, exclude, block_size=97))
    assert all(1 <= b.shape[0] <= 97 and b.dtype == np.int64 for b in blocks)
    got = np.concatenate(blocks)
    assert (got[:, 0] < got[:, 1]).all()
    assert got.shape[0] == len(as_set(got))  # no duplicates
    want = set(every) - {(min(a, b), max(a, b)) for a, b in exclude.tolist()}
    assert as_set(got) == want
    assert got.shape[0] == count_exhaustive(60) - 150


def test_exhaustive_blocks_small_and_edge_cases() -> None:
    blocks = list(exhaustive_blocks(np.array([7, 3, 5, 3])))  # unsorted, duplicate
    assert len(blocks) == 1 and blocks[0].tolist() == [[3, 5], [3, 7], [5, 7]]
    assert list(exhaustive_blocks(np.array([4]))) == []
    assert list(exhaustive_blocks(np.array([1, 2]), np.array([[2, 1]]))) == []
    with pytest.raises(ConfigError, match="block_size"):
        exhaustive_blocks(np.arange(5), None, block_size=0)
    with pytest.raises(ValueError, match="negative"):
        exhaustive_blocks(np.array([-1, 2]))


def test_exhaustive_blocks_are_lazy() -> None:
    # 200k ids = 2e10 pairs: only the first block may be built.
    blocks = exhaustive_blocks(np.arange(200_000), None, block_size=50_000)
    first = next(blocks)
    assert first.shape == (50_000, 2)
    assert first[:3].tolist() == [[0, 1], [0, 2], [0, 3]]
    second = next(blocks)
    assert second[0].tolist() == [0, 50_001]


def brute_knn(emb: np.ndarray, ids: np.ndarray, k: int) -> dict[int, list[int]]:
    x = emb[ids].astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    return {int(ids[r]): ids[nn[r]].tolist() for r in range(ids.size)}


def test_knn_contains_true_neighbours(eurosat_embeddings: np.ndarray) -> None:
    emb = eurosat_embeddings
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(emb.shape[0], size=200, replace=False))
    k = 10
    got = knn_candidates(emb, ids, k=k, far_fraction=0.0)
    assert got.dtype == np.int64 and (got[:, 0] < got[:, 1]).all()
    assert np.isin(got, ids).all()
    truth = brute_knn(emb, ids, k)
    want = {(min(a, b), max(a, b)) for a, nbrs in truth.items() for b in nbrs}
    # Exactly the symmetrised k-NN graph: every true neighbour pair, and nothing else.
    assert as_set(got) == want
    assert got.shape[0] == len(want)
    assert got.tolist() == sorted(got.tolist())


def test_knn_far_pairs_exclude_and_seed(eurosat_embeddings: np.ndarray) -> None:
    emb = eurosat_embeddings
    ids = np.arange(0, emb.shape[0], 2)
    edges = as_set(knn_candidates(emb, ids, k=8, far_fraction=0.0))
    both = knn_candidates(emb, ids, k=8, far_fraction=0.25, rng=3)
    far = as_set(both) - edges
    assert edges <= as_set(both)
    assert len(far) == round(0.25 * len(edges))
    assert all(a in set(ids.tolist()) and b in set(ids.tolist()) for a, b in far)
    # Deterministic given the seed; another seed draws other far pairs.
    assert knn_candidates(emb, ids, k=8, far_fraction=0.25, rng=3).tolist() == both.tolist()
    gen = knn_candidates(emb, ids, k=8, far_fraction=0.25, rng=np.random.default_rng(3))
    assert gen.tolist() == both.tolist()
    assert as_set(knn_candidates(emb, ids, k=8, far_fraction=0.25, rng=4)) - edges != far

    exclude = np.array(sorted(edges))[::3]
    exclude = np.concatenate((exclude[:, ::-1], np.array(sorted(far))[:5]))  # any row order
    kept = knn_candidates(emb, ids, k=8, far_fraction=0.25, exclude=exclude, rng=3)
    excluded = {(min(a, b), max(a, b)) for a, b in exclude.tolist()}
    assert not as_set(kept) & excluded
    kept_edges = as_set(kept) & edges
    assert kept_edges == edges - excluded
    assert len(as_set(kept) - edges) == round(0.25 * len(kept_edges))


def test_knn_small_sets_duplicates_and_errors(eurosat_embeddings: np.ndarray) -> None:
    emb = eurosat_embeddings
    ids = np.array([5, 9, 11, 40, 41])
    # k is clipped to len(ids) - 1: the complete graph, and no far pair is left to add.
    got = knn_candidates(emb, ids, k=50, far_fraction=0.5)
    assert as_set(got) == set(itertools.combinations(ids.tolist(), 2))
    assert knn_candidates(emb, np.array([3]), k=5).shape == (0, 2)
    # Identical vectors: no self pairs, each patch still gets k neighbours.
    dup = np.repeat(emb[:10], 3, axis=0)
    got = knn_candidates(dup, np.arange(30), k=2, far_fraction=0.0)
    assert (got[:, 0] < got[:, 1]).all()
    counts = np.bincount(got.ravel(), minlength=30)
    assert (counts >= 2).all()
    with pytest.raises(ConfigError, match="k = 0"):
        knn_candidates(emb, ids, k=0)
    with pytest.raises(ConfigError, match="far_fraction"):
        knn_candidates(emb, ids, far_fraction=-0.1)
    with pytest.raises(ValueError, match="out of range"):
        knn_candidates(emb, np.array([0, emb.shape[0]]))


def test_knn_far_pairs_by_rejection_on_a_larger_pool() -> None:
    # 3,000 points: 4.5M pairs, far pairs are drawn by rejection sampling.
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 8)).astype(np.float32)
    ids = np.arange(3000)
    edges = as_set(knn_candidates(emb, ids, k=5, far_fraction=0.0))
    both = knn_candidates(emb, ids, k=5, far_fraction=0.1, rng=1)
    far = as_set(both) - edges
    assert len(far) == round(0.1 * len(edges))
    assert len(as_set(both)) == both.shape[0]


def test_modes_and_entry_point(eurosat_embeddings: np.ndarray) -> None:
    emb = eurosat_embeddings
    assert count_exhaustive(0) == count_exhaustive(1) == 0
    assert count_exhaustive(60) == 1770
    assert default_mode(EXHAUSTIVE_MAX_PATCHES) == "exhaustive"
    assert default_mode(EXHAUSTIVE_MAX_PATCHES + 1) == "knn"
    with pytest.raises(ConfigError, match=r"'nearest'.*auto, exhaustive, knn"):
        candidate_blocks("nearest", emb, np.arange(10), None, 0)  # raised at call time
    assert MODES == ("auto", "exhaustive", "knn", "uniform")

    ids = np.arange(100)
    exclude = np.array([[0, 1], [2, 3]])
    ex = list(candidate_blocks("exhaustive", emb, ids, exclude, 0, block_size=1000))
    assert [b.shape[0] for b in ex] == [998, 1000, 1000, 1000, 950]  # excluded pairs sit in block 1
    auto = list(candidate_blocks("auto", emb, ids, exclude, 0, block_size=1000))
    assert np.concatenate(auto).tolist() == np.concatenate(ex).tolist()

    knn = list(candidate_blocks("knn", emb, ids, exclude, 7, k=6, block_size=100))
    assert all(b.shape[0] <= 100 for b in knn)
    want = knn_candidates(emb, ids, k=6, exclude=exclude, rng=7)
    assert np.concatenate(knn).tolist() == want.tolist()


def test_import_is_light() -> None:
    # Tests may import faiss; the package itself must not at import time.
    code = (
        "import sys, anneal_geo.pairs; "
        "print(sorted(m for m in ('faiss', 'torch', 'rasterio', 'torchgeo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_uniform_candidates_are_distinct_excluded_and_spread():
    from anneal_geo.pairs.candidates import candidate_blocks, uniform_candidates

    ids = np.arange(0, 4000, 2, dtype=np.int64)  # 2,000 patches, ~2M pairs
    exclude = np.array([[0, 2], [4, 6]], dtype=np.int64)
    pairs = uniform_candidates(ids, 50_000, exclude, np.random.default_rng(1))
    assert pairs.shape == (50_000, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all() and np.isin(pairs, ids).all()
    keys = pairs[:, 0] * 4000 + pairs[:, 1]
    assert np.unique(keys).size == keys.size
    assert not np.isin(keys, exclude[:, 0] * 4000 + exclude[:, 1]).any()
    # Uniform over pairs: each patch appears about 2 * 50,000 / 2,000 = 50 times.
    counts = np.bincount(pairs.ravel() // 2, minlength=2000)
    assert 30 < counts.mean() < 70 and counts.std() < 15
    # Small pools fall back to every pair.
    small = np.concatenate(list(candidate_blocks("uniform", np.zeros((10, 2)), np.arange(10),
                                                 None, 0)))
    assert small.shape == (45, 2)
