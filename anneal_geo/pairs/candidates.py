"""Candidate pairs: the unlabelled pairs a round may ask about (METHOD.md 3.2).

Two generators behind one entry point, :func:`candidate_blocks`:

- ``exhaustive``: every pair among the allowed ids, yielded block by block so N x N is never
  held in memory; fine for small pools (see :data:`EXHAUSTIVE_MAX_PATCHES`).
- ``knn``: the edges of the K-nearest-neighbour graph of the embeddings (faiss), plus a
  random sample of far pairs. The graph is exact (``IndexFlatL2``, cost N^2 D) up to
  :data:`EXACT_KNN_MAX_PATCHES` ids and approximate above (clustered IVF search, cost about
  N D (probes x list size), linear in N); see :func:`knn_candidates`.

Both drop the excluded pairs (queried and implied). Patch ids are PatchPool row indices and
every pair has ``i < j``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import numpy as np

from anneal_geo.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "EXACT_KNN_MAX_PATCHES",
    "EXHAUSTIVE_MAX_PATCHES",
    "IVF_LIST_SIZE",
    "IVF_MAX_DIM",
    "IVF_PROBES",
    "KNN_EDGE_BUDGET",
    "KNN_METHODS",
    "MODES",
    "candidate_blocks",
    "count_exhaustive",
    "default_mode",
    "exhaustive_blocks",
    "in_sorted",
    "ivf_cells",
    "knn_candidates",
    "pair_keys",
    "principal_projection",
    "sorted_keys",
    "suggested_knn_k",
    "triu_pairs",
    "uniform_candidates",
    "unique_sorted",
]

#: Candidate modes; ``auto`` picks :func:`default_mode` from the number of ids.
MODES: Final = ("auto", "exhaustive", "knn", "uniform")

#: Pairs drawn by ``uniform`` candidates (a uniform sample of all pairs among the ids).
UNIFORM_SAMPLE: Final = 200_000

#: Pairs per block handed to the estimator.
DEFAULT_BLOCK_SIZE: Final = 1_000_000

#: Largest pool scored exhaustively by ``auto``. Measured on the 2-core development machine
#: (torch 2 threads, inference mode, 64k-pair chunks): scoring 1M pairs with the BCGUE head
#: (g_ij = [|f_i - f_j|, f_i * f_j], D = 128, 256 -> 256 -> 1 MLP) takes 2.6-2.9 s wall on a
#: quiet machine (5-6 s of CPU time; 7-12 s wall while other jobs share the cores); MGUE
#: (distances only) about 0.3 s; enumerating the pairs themselves 0.08 s per 1.1M. 1,500
#: patches give 1.12M pairs, about 3 s per round for BCGUE, the "few seconds" we allow;
#: 2,000 would be 2M pairs (about 6 s), and the cost grows with N^2 while knn grows with N K.
EXHAUSTIVE_MAX_PATCHES: Final = 1_500

# Queries per faiss search call in knn_candidates: bounds the (chunk, k + 1) result arrays.
_KNN_QUERY_CHUNK: Final = 65_536

#: How the k-NN graph is searched: ``exact`` (faiss ``IndexFlatL2``), ``ivf`` (clustered,
#: approximate) or ``auto`` (exact up to :data:`EXACT_KNN_MAX_PATCHES` ids, else ivf).
KNN_METHODS: Final = ("auto", "exact", "ivf")

#: Largest set of ids whose k-NN graph ``auto`` computes exactly. Exact search costs
#: N^2 D multiply-adds: measured on the 2-core development machine (D = 128, K = 10, shared
#: with other jobs) 20k ids take 1 s, 40k 4 s and 100k 26 s, where the IVF search below
#: takes 0.4 s, 0.7 s and 1.8 s. Below this size exactness is cheap enough to keep.
EXACT_KNN_MAX_PATCHES: Final = 20_000

#: Points per IVF cell (inverted list) of the approximate k-NN graph. Each point is
#: compared with the points of its :data:`IVF_PROBES` nearest cells, so the search costs
#: about N x IVF_PROBES x IVF_LIST_SIZE distances: linear in N for a fixed list size.
IVF_LIST_SIZE: Final = 128

#: Cells searched per point. Measured at 1M synthetic clustered embeddings (D = 128,
#: 8-dimensional clusters plus noise, K = 10, benchmarks/scale_selection.py): 4 probes of
#: 128 points keep 90 % of the exact 10-NN pairs, the neighbours found 1.4 % farther on
#: average than the exact ones, in 19 s; 3 probes of 256 points found fewer (80 % of a
#: point's 10 nearest against 82 %) in about the same time, 6 probes of 64 more (84 %) in
#: 10 % more time, mostly spent partitioning.
IVF_PROBES: Final = 4

#: Widest embedding the IVF graph is searched in. Wider embeddings (the default mixed
#: embedding is 376-d: the head's 128 and the 248 texture features) are projected onto their
#: first IVF_MAX_DIM principal components for the search alone: its cost grows with D, and
#: the pairs it finds are scored in the full embedding afterwards.
IVF_MAX_DIM: Final = 128

# Rows the principal axes are fitted on (a seeded sample), and rows projected at a time.
_PCA_SAMPLE: Final = 65_536
_PCA_BLOCK: Final = 65_536

#: Directed k-NN edges (ids x k) that :func:`suggested_knn_k` aims at: about the candidate
#: count the 60-second selection budget allows at 1M patches (benchmarks/scale_selection.py).
KNN_EDGE_BUDGET: Final = 10_000_000

# Coarse cells per top-level cell are trained on at most this many points each (faiss
# subsamples), and k-means runs this many iterations: the partition only has to be
# reasonable, it is not the result.
_IVF_TRAIN_PER_CELL: Final = 64
_IVF_NITER: Final = 10
# Each point's probes are chosen among the cells of this many nearest top-level cells.
_IVF_TOP_NEIGHBOURS: Final = 4
# The approximate graph is a function of the embeddings alone: its k-means runs on this seed.
_IVF_SEED: Final = 1234


# -- keys and membership ------------------------------------------------------------------


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array, by sorting and masking.

    Same result as ``np.unique(values)``, which in numpy 2.5 takes a hash-table path for
    integers that is measured 10-18 times slower than a sort on millions of keys (5M keys:
    5.7 s against 0.3 s). Candidate generation deduplicates tens of millions of pair keys.

    Args:
        values: a 1-D array.

    Returns:
        the sorted distinct values, same dtype.
    """
    return _drop_repeats(np.sort(np.asarray(values).reshape(-1)))


def _drop_repeats(ordered: np.ndarray) -> np.ndarray:
    """The distinct values of a sorted 1-D array (the array itself below two values)."""
    if ordered.size < 2:
        return ordered
    keep = np.empty(ordered.size, dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _union_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two key arrays (``np.union1d`` without its slow unique)."""
    return unique_sorted(np.concatenate((a, b)))


def pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    """One int64 key per pair, ``i * n + j``: equal pairs have equal keys.

    Args:
        pairs: (M, 2) integer patch ids, each below ``n``; pass normalised pairs (i < j)
            so that (i, j) and (j, i) get the same key.
        n: an upper bound on patch ids (usually the pool size).

    Returns:
        (M,) int64 keys.
    """
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if n < 0 or n > 3_037_000_499:  # beyond that, n * n overflows int64
        raise ValueError(f"n = {n} is out of range for int64 pair keys")
    return arr[:, 0] * np.int64(n) + arr[:, 1]


def sorted_keys(pairs: np.ndarray | None, n: int) -> np.ndarray:
    """Sorted unique keys of normalised ``pairs`` (order within a row is ignored).

    Args:
        pairs: (M, 2) integer patch ids, or None for an empty set.
        n: an upper bound on patch ids.

    Returns:
        (K,) int64, sorted, unique; the argument of :func:`in_sorted`.
    """
    if pairs is None:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"excluded pairs must hold patch ids in [0, {n})")
    return unique_sorted(pair_keys(np.sort(arr, axis=1), n))


def in_sorted(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Membership of each key in a sorted key array, by binary search (no Python loop).

    Args:
        keys: (M,) int64 keys to test.
        sorted_set: (K,) sorted int64 keys, e.g. from :func:`sorted_keys`.

    Returns:
        (M,) bool, True where the key is in ``sorted_set``.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if sorted_set.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(sorted_set, keys)
    pos = np.minimum(pos, sorted_set.size - 1)
    return sorted_set[pos] == keys


def _check_ids(ids: np.ndarray, what: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D integer array of patch ids, got {arr.dtype}")
    arr = unique_sorted(arr.astype(np.int64))  # sorted, unique: pairs come out with i < j
    if arr.size and arr[0] < 0:
        raise ValueError(f"{what} contains the negative patch id {int(arr[0])}")
    return arr


def _key_base(ids: np.ndarray, exclude: np.ndarray | None) -> int:
    """A key base above every id in play."""
    top = int(ids[-1]) if ids.size else 0
    if exclude is not None and np.size(exclude):
        top = max(top, int(np.max(exclude)))
    return top + 1


# -- exhaustive ---------------------------------------------------------------------------


def count_exhaustive(n: int) -> int:
    """Number of unordered pairs among ``n`` patches, n (n - 1) / 2."""
    return n * (n - 1) // 2 if n > 1 else 0


def default_mode(n: int) -> str:
    """``"exhaustive"`` up to :data:`EXHAUSTIVE_MAX_PATCHES` patches, else ``"knn"``."""
    return "exhaustive" if n <= EXHAUSTIVE_MAX_PATCHES else "knn"


def _triu_starts(m: int) -> np.ndarray:
    """Linear index of the first pair of each row of the strict upper triangle."""
    # Row r starts at sum_{a<r} (m - 1 - a); exact integers, so no sqrt rounding issues.
    return np.concatenate(([0], np.cumsum(np.arange(m - 1, 0, -1, dtype=np.int64))))


def triu_pairs(
    m: int, index: np.ndarray, starts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode linear indices into the strict upper triangle of an m x m matrix.

    Index 0 is (0, 1), then (0, 2) ... (0, m - 1), (1, 2) ... row by row, the order of
    ``np.triu_indices(m, 1)``, but for any subset of indices and without building the
    triangle (memory O(m + len(index))).

    Args:
        m: matrix size.
        index: int64 indices in ``[0, m (m - 1) / 2)``.
        starts: the row starts for this ``m``, when decoding many batches (else computed).

    Returns:
        rows, cols: int64 arrays, ``rows < cols``.
    """
    k = np.asarray(index, dtype=np.int64)
    if starts is None:
        starts = _triu_starts(m)
    rows = np.searchsorted(starts, k, side="right") - 1
    cols = rows + 1 + (k - starts[rows])
    return rows, cols


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or int(block_size) < 1:
        raise ConfigError(f"candidates block_size = {block_size} must be a positive integer")
    return int(block_size)


def exhaustive_blocks(
    ids: np.ndarray,
    exclude: np.ndarray | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[np.ndarray]:
    """All pairs among ``ids``, block by block, minus the excluded pairs.

    Blocks follow the upper triangle row by row; each holds at most ``block_size`` pairs
    (fewer after exclusion; empty blocks are not yielded). Memory is O(len(ids) +
    block_size), never N x N. Arguments are checked at call time, not at the first block.

    Args:
        ids: patch ids allowed in pairs (e.g. the archive part of the pool); sorted and
            deduplicated here.
        exclude: (E, 2) pairs to leave out (queried and implied), any row order, or None.
        block_size: the most pairs per block.

    Returns:
        An iterator of (B, 2) int64 arrays with ``i < j``.
    """
    ids_arr = _check_ids(ids)
    size = _check_block_size(block_size)
    base = _key_base(ids_arr, exclude)
    return _exhaustive_iter(ids_arr, sorted_keys(exclude, base), base, size)


def _exhaustive_iter(
    ids: np.ndarray, excluded: np.ndarray, base: int, block_size: int
) -> Iterator[np.ndarray]:
    m = int(ids.size)
    total = count_exhaustive(m)
    starts = _triu_starts(m)
    for lo in range(0, total, block_size):
        index = np.arange(lo, min(lo + block_size, total), dtype=np.int64)
        rows, cols = triu_pairs(m, index, starts)
        block = np.stack((ids[rows], ids[cols]), axis=1)
        if excluded.size:
            block = block[~in_sorted(pair_keys(block, base), excluded)]
        if block.shape[0]:
            yield block


# -- knn ----------------------------------------------------------------------------------


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    # None means seed 0, not OS entropy: candidate sets must be reproducible.
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def suggested_knn_k(
    n: int, edge_budget: int = KNN_EDGE_BUDGET, largest: int = 50, smallest: int = 10
) -> int:
    """A neighbour count K for a pool of ``n`` ids: ``edge_budget / n`` within [smallest, largest].

    The k-NN graph has about n K / 1.5 distinct pairs once symmetrised, and every one is
    scored each round, so the selection time grows with n K. K = 50 is cheap up to about
    200k ids; at 1M it would give ~35M candidate pairs (about 4 times the 60-second budget
    of benchmarks/scale_selection.py) where K = 10 gives ~7M. Fewer neighbours lose little
    on a large pool: the 10 nearest of a million patches are already far closer than the
    similar/dissimilar threshold, so pairs near that threshold come from the far-pair
    sample and the neighbour edges of less dense regions either way.

    Args:
        n: number of ids in the candidate pool.
        edge_budget: directed edges (n x K) to aim at.
        largest: the K of small pools.
        smallest: the least K used however large the pool.

    Returns:
        K, an int in ``[smallest, largest]``.
    """
    if n <= 0:
        return int(largest)
    return int(min(largest, max(smallest, edge_budget // n)))


def _exact_neighbours(emb: np.ndarray, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, (len(rows), k + 1) neighbour rows) blocks of the exact k-NN search."""
    import faiss  # heavy: imported where used

    # Thread count: faiss's default (all cores via OpenMP); setting it here would change a
    # process-wide setting behind the caller's back.
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    for lo in range(0, emb.shape[0], _KNN_QUERY_CHUNK):
        hi = min(lo + _KNN_QUERY_CHUNK, emb.shape[0])
        # k + 1: the query itself is (nearly always) its own first neighbour.
        _, nbr = index.search(emb[lo:hi], k + 1)
        yield np.arange(lo, hi, dtype=np.int64), nbr


def _kmeans_centroids(points: np.ndarray, count: int, seed: int, per_cell: int) -> np.ndarray:
    """``count`` k-means centroids of ``points`` (faiss, trained on a seeded subsample)."""
    import faiss

    if count <= 1:
        return np.ascontiguousarray(points.mean(axis=0, keepdims=True), dtype=np.float32)
    kmeans = faiss.Kmeans(
        points.shape[1],
        count,
        niter=_IVF_NITER,
        seed=seed,
        # faiss subsamples to per_cell points per centroid (seeded); min 1 silences its
        # "too few points" warning for the small cells of a small pool.
        max_points_per_centroid=per_cell,
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(points)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


@contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` faiss (OpenMP) threads, restoring the setting after."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _groups(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by label, and the start of each label's run (``count + 1`` entries)."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(count + 1))


def ivf_cells(
    emb: np.ndarray, list_size: int = IVF_LIST_SIZE, probes: int = IVF_PROBES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition ``emb`` into cells of about ``list_size`` points; each point's nearest cells.

    A two-level k-means: about sqrt(cells) top-level cells, each split into cells of about
    ``list_size`` of its points. A point's ``probes`` nearest cells are searched among the
    cells of its few nearest top-level cells, so no point is compared with every cell
    centroid (that flat assignment would cost N^2 D / list_size, quadratic in N; this costs
    about N D sqrt(cells) (1 + :data:`_IVF_TOP_NEIGHBOURS`)).

    Args:
        emb: (M, D) float32, C-contiguous.
        list_size: target points per cell.
        probes: nearest cells to return per point.

    Returns:
        (centroids (C, D) float32; probe (M, P) int64 cell ids nearest first, the first
        being the point's own cell, P = min(probes, C); probe_dist (M, P) float32 squared
        distances to those cells).
    """
    # One faiss thread throughout: these are many mid-sized calls, where OpenMP start-up and
    # spinning cost more than a second thread gains, far more while other jobs share the
    # cores (measured on the 2-core machine at 1M points: the top-level assignment took
    # 1.5 s on one thread and 4.9 s on two, the whole partition 6 s against 38 s).
    with _faiss_threads(1):
        return _ivf_cells(emb, list_size, probes)


def _ivf_cells(
    emb: np.ndarray, list_size: int, probes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import faiss

    m = emb.shape[0]
    n_cells = max(1, round(m / list_size))
    # sqrt(reach x cells) top cells balance the two costs per point: n_top distances to the
    # top centroids, and reach x n_cells / n_top distances to the cells of its top cells.
    n_top = max(1, min(n_cells, round(math.sqrt(_IVF_TOP_NEIGHBOURS * n_cells))))
    top = _kmeans_centroids(emb, n_top, _IVF_SEED, per_cell=4 * _IVF_TRAIN_PER_CELL)
    n_top = top.shape[0]
    reach = min(_IVF_TOP_NEIGHBOURS, n_top)
    _, near_top = faiss.knn(emb, top, reach)  # (m, reach): each point's nearest top cells
    order, starts = _groups(near_top[:, 0], n_top)
    # Every (point, rank) whose rank-th nearest top cell is t, grouped by t.
    by_top, top_starts = _groups(near_top.reshape(-1), n_top)
    # Cells of each top-level cell (of the points it is nearest to), split by size.
    centroids: list[np.ndarray] = []
    first_cell = np.zeros(n_top + 1, dtype=np.int64)
    for t in range(n_top):
        members = order[starts[t] : starts[t + 1]]
        count = min(members.size, max(1, round(members.size / list_size)))
        if count:
            centroids.append(
                _kmeans_centroids(emb[members], count, _IVF_SEED + 1 + t, _IVF_TRAIN_PER_CELL)
            )
        first_cell[t + 1] = first_cell[t] + count
    cells = np.concatenate(centroids)
    # Candidate cells of a point: the nearest `probes` cells inside each of its `reach`
    # nearest top cells, one top cell at a time (one matrix product per top cell), then
    # the best `probes` of those. Choosing among the cells of the top cells near the
    # *point* (not near its top cell) matters: measured at 100k, the latter found 57 % of
    # the exact neighbours where exact probes found 79 %.
    # int32 cell ids (fewer than 2**31 cells): at 1M points x 16 candidates that is 64 MB
    # less at the peak of a round's selection.
    cand_cell = np.full((m, reach * probes), -1, dtype=np.int32)
    cand_dist = np.full((m, reach * probes), np.inf, dtype=np.float32)
    for t in range(n_top):
        lo_cell, hi_cell = int(first_cell[t]), int(first_cell[t + 1])
        flat = by_top[top_starts[t] : top_starts[t + 1]]
        rows, rank = flat // reach, flat % reach
        if hi_cell == lo_cell or not rows.size:
            continue
        width = min(probes, hi_cell - lo_cell)
        dist, nearest = faiss.knn(emb[rows], cells[lo_cell:hi_cell], width)
        cols = rank[:, None] * probes + np.arange(width)[None, :]
        cand_cell[rows[:, None], cols] = nearest + lo_cell
        cand_dist[rows[:, None], cols] = dist
    width = min(probes, cells.shape[0])
    # The best `width` candidates of each point, a block of rows at a time: one argsort of
    # all rows would allocate (m, reach x probes) int64 indices (128 MB at 1M points).
    probe = np.empty((m, width), dtype=np.int64)
    probe_dist = np.empty((m, width), dtype=np.float32)
    for lo in range(0, m, _KNN_QUERY_CHUNK):
        block = slice(lo, lo + _KNN_QUERY_CHUNK)
        best = np.argsort(cand_dist[block], axis=1, kind="stable")[:, :width]
        probe[block] = np.take_along_axis(cand_cell[block], best, axis=1)
        probe_dist[block] = np.take_along_axis(cand_dist[block], best, axis=1)
    del cand_cell, cand_dist
    # A point whose nearby top cells hold fewer than `width` cells (tiny pools, lopsided
    # top cells) gets its probes from all cells. No probe may stay -1: faiss 1.15's
    # search_preassigned returns wrong neighbours for a batch of queries when some probe
    # lists are -1 (measured: 190 of 283 rows wrong; right when queried one at a time).
    short = ~np.isfinite(probe_dist).all(axis=1)
    if short.any():
        dist, nearest = faiss.knn(emb[short], cells, width)
        probe[short], probe_dist[short] = nearest, dist
    return cells, probe, probe_dist


def _ivf_neighbours(emb: np.ndarray, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, (len(rows), k + 1) neighbour rows) blocks of the approximate k-NN search.

    faiss IVF with per-point probes (:func:`ivf_cells`) over vectors stored as float16
    (half the memory of float32, the same speed, distances within ~1e-3 relative). Queries
    go in the order of their own cell, so consecutive queries scan mostly the same lists
    while they are in the cache: measured twice as fast as id order at 1M points.
    """
    import faiss

    cells, probe, probe_dist = ivf_cells(emb)
    dim = emb.shape[1]
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(cells)
    # Typed Any: faiss's stubs describe the C++ signatures, not the numpy wrappers used here.
    index: Any = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, cells.shape[0], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2
    )
    index.train(emb[:1])  # float16 needs no statistics; the quantizer is already filled
    own_cell = np.ascontiguousarray(probe[:, 0])
    data = np.ascontiguousarray(emb, dtype=np.float32)
    # Each list's storage is allocated at its final size first (then emptied, keeping the
    # capacity): faiss adds a point at a time, and the lists' doubling growth held 50 %
    # more than the codes (370 MB against 250 MB at 1M x 128). The lists are the same.
    invlists = index.invlists
    for cell, count in enumerate(np.bincount(own_cell, minlength=cells.shape[0]).tolist()):
        invlists.resize(cell, count)
        invlists.resize(cell, 0)
    # Points go to the cells ivf_cells chose (no second coarse assignment); both arrays are
    # bound to names so they outlive the raw pointers handed to faiss.
    index.add_core(data.shape[0], faiss.swig_ptr(data), None, faiss.swig_ptr(own_cell))
    index.nprobe = probe.shape[1]
    order = np.argsort(own_cell, kind="stable")
    for lo in range(0, order.size, _KNN_QUERY_CHUNK):
        rows = order[lo : lo + _KNN_QUERY_CHUNK]
        _, nbr = index.search_preassigned(data[rows], k + 1, probe[rows], probe_dist[rows])
        yield rows, nbr


def principal_projection(emb: np.ndarray, dim: int) -> np.ndarray:
    """``emb`` (M, D) projected onto its ``dim`` leading principal axes (centred), float32,
    C-contiguous; ``emb`` itself when D <= dim.

    The axes come from the covariance of at most :data:`_PCA_SAMPLE` rows drawn with a fixed
    seed (a function of the embeddings alone, like the IVF partition); the projection runs
    in blocks, so only the (M, dim) result is allocated. Euclidean distances shrink by what
    the dropped axes carried, which the k-NN search tolerates: it only proposes pairs.
    """
    m, d = emb.shape
    if d <= dim:
        return emb
    rng = np.random.default_rng(_IVF_SEED)
    sample = emb[np.sort(rng.choice(m, size=min(m, _PCA_SAMPLE), replace=False))]
    sample = sample.astype(np.float64)
    mean = sample.mean(axis=0)
    sample -= mean
    covariance = sample.T @ sample
    del sample  # 200 MB of float64 rows, gone before the (M, dim) result is written
    _, vectors = np.linalg.eigh(covariance)
    axes = np.ascontiguousarray(vectors[:, ::-1][:, :dim], dtype=np.float32)  # (D, dim)
    centre = mean.astype(np.float32)
    out = np.empty((m, dim), dtype=np.float32)
    for lo in range(0, m, _PCA_BLOCK):
        np.matmul(emb[lo : lo + _PCA_BLOCK] - centre, axes, out=out[lo : lo + _PCA_BLOCK])
    return out


def _knn_edge_keys(
    emb: np.ndarray, ids: np.ndarray, k: int, base: int, method: str
) -> np.ndarray:
    """Sorted unique keys of the symmetrised k-NN graph over ``emb`` (rows = ``ids``)."""
    # The projection (512 MB at 1M x 128) is bound to the generator alone, so it goes with
    # the search's index when the last block is read, before the keys are merged.
    blocks = (
        _ivf_neighbours(principal_projection(emb, IVF_MAX_DIM), k)
        if method == "ivf"
        else _exact_neighbours(emb, k)
    )
    # The keys go into one array of the most there can be (k per row), sorted in place at
    # the end: a list of per-block results held 50 % more than the keys (fragmented) and
    # their concatenation a second copy.
    keys = np.empty(emb.shape[0] * k, dtype=np.int64)
    filled = 0
    for rows, found in blocks:
        row = rows[:, None]
        nbr = found.astype(np.int64, copy=False)
        # Drop self and faiss's -1 padding, then keep the first k left: with duplicate
        # vectors the query may not come first, or may be missing from its own list.
        valid = (nbr != row) & (nbr >= 0)
        keep = valid & (np.cumsum(valid, axis=1) <= k)
        a = np.broadcast_to(row, nbr.shape)[keep]
        b = nbr[keep]
        part = keys[filled : filled + a.size]
        np.multiply(ids[np.minimum(a, b)], np.int64(base), out=part)
        part += ids[np.maximum(a, b)]
        filled += a.size
    del blocks
    keys = keys[:filled]
    keys.sort()
    return _drop_repeats(keys) if keys.size >= 2 else keys.copy()


def _sample_far_keys(
    ids: np.ndarray,
    taken: np.ndarray,
    count: int,
    base: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``count`` random distinct pair keys among ``ids`` that are not in sorted ``taken``.

    Fewer when fewer such pairs exist (or, for a huge triangle that is almost all taken,
    when 64 rejection batches did not find enough).
    """
    m = int(ids.size)
    total = count_exhaustive(m)
    if count <= 0 or total == 0:
        return np.empty(0, dtype=np.int64)
    # Small triangles, or a request close to all free pairs: enumerate and choose.
    if total <= max(4 * count, 250_000):
        rows, cols = triu_pairs(m, np.arange(total, dtype=np.int64))
        keys = ids[rows] * np.int64(base) + ids[cols]
        free = keys[~in_sorted(keys, taken)]
        if free.size <= count:
            return free
        return np.sort(rng.choice(free, size=count, replace=False))
    # Large triangles: rejection sampling in vectorised batches; collisions with `taken`
    # are rare because knn edges are a small part of all pairs.
    found = np.empty(0, dtype=np.int64)
    starts = _triu_starts(m)
    for _ in range(64):
        need = count - found.size
        if need <= 0:
            break
        draw = rng.integers(0, total, size=2 * need + 16, dtype=np.int64)
        rows, cols = triu_pairs(m, draw, starts)
        keys = ids[rows] * np.int64(base) + ids[cols]
        keys = keys[~in_sorted(keys, taken)]
        # Keep first occurrences in draw order, so the result depends only on the rng.
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
        keys = keys[~in_sorted(keys, np.sort(found))]
        found = np.concatenate((found, keys[:need]))
    return np.sort(found)


def knn_candidates(
    embeddings: np.ndarray,
    ids: np.ndarray,
    k: int = 50,
    far_fraction: float = 0.1,
    exclude: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
    *,
    method: str = "auto",
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Pairs of near neighbours in embedding space, plus a few random far pairs.

    The k-nearest-neighbour graph over ``embeddings[ids]`` gives one edge per (patch,
    neighbour), symmetrised and deduplicated. Excluded pairs are removed, then
    ``round(far_fraction * edges left)`` random non-edge, non-excluded pairs among ``ids``
    are added so the estimator also sees pairs the current metric calls far.

    The graph is exact (faiss ``IndexFlatL2``) up to :data:`EXACT_KNN_MAX_PATCHES` ids and
    approximate above (``method="auto"``): a faiss IVF search in which each point scans
    the :data:`IVF_PROBES` nearest cells of about :data:`IVF_LIST_SIZE` points
    (:func:`ivf_cells`), so the cost grows linearly with the number of ids instead of with
    its square. The approximate graph depends on the embeddings only (its k-means is
    seeded with a constant), not on ``rng``.

    Args:
        embeddings: (N, D) float embeddings of the whole pool (row = patch id).
        ids: patch ids allowed in pairs (sorted and deduplicated here).
        k: neighbours per patch; clipped to ``len(ids) - 1``.
        far_fraction: far pairs per kept edge (>= 0).
        exclude: (E, 2) pairs to leave out, or None.
        rng: generator or seed of the far-pair sample; None = seed 0.
        method: ``"auto"``, ``"exact"`` or ``"ivf"`` (see :data:`KNN_METHODS`).
        stats: a dict to fill with what was done: ``knn_method``, ``knn_edges`` (after
            exclusion), ``far_pairs``, ``seconds_neighbours`` (the graph search) and
            ``seconds_far`` (exclusion, far sample, merge).

    Returns:
        (M, 2) int64 pairs with ``i < j``, sorted, unique.
    """
    emb_all = np.asarray(embeddings)
    if emb_all.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb_all.shape}")
    ids_arr = _check_ids(ids)
    if ids_arr.size and ids_arr[-1] >= emb_all.shape[0]:
        raise ValueError(
            f"patch id {int(ids_arr[-1])} is out of range for {emb_all.shape[0]} embeddings"
        )
    if isinstance(k, bool) or int(k) < 1:
        raise ConfigError(f"candidates k = {k} must be a positive integer")
    if not np.isfinite(far_fraction) or far_fraction < 0:
        raise ConfigError(f"candidates far_fraction = {far_fraction} must be >= 0")
    if method not in KNN_METHODS:
        raise ConfigError(
            f"candidates knn method {method!r} is unknown; choose one of: {', '.join(KNN_METHODS)}"
        )
    generator = _as_rng(rng)
    m = int(ids_arr.size)
    if m < 2:
        return np.empty((0, 2), dtype=np.int64)
    if method == "auto":
        method = "exact" if m <= EXACT_KNN_MAX_PATCHES else "ivf"
    base = _key_base(ids_arr, exclude)
    started = time.perf_counter()
    # Every id: no gather copy of the embeddings (512 MB at 1M x 128).
    everything = m == emb_all.shape[0]
    emb = np.ascontiguousarray(emb_all if everything else emb_all[ids_arr], dtype=np.float32)
    # Checked a block of rows at a time: a mask of the whole (1M x 376) is 376 MB.
    if not all(
        np.isfinite(emb[lo : lo + _KNN_QUERY_CHUNK]).all()
        for lo in range(0, emb.shape[0], _KNN_QUERY_CHUNK)
    ):
        raise ValueError("embeddings contain NaN or infinite values")
    edges = _knn_edge_keys(emb, ids_arr, min(int(k), m - 1), base, method)
    del emb
    searched = time.perf_counter()
    excluded = sorted_keys(exclude, base)
    edges = edges[~in_sorted(edges, excluded)]
    n_far = round(float(far_fraction) * edges.size)
    taken = _union_sorted(edges, excluded)
    far = _sample_far_keys(ids_arr, taken, n_far, base, generator)
    del taken
    keys = _union_sorted(edges, far)
    if stats is not None:
        stats.update(
            knn_method=method,
            knn_dim=min(emb_all.shape[1], IVF_MAX_DIM) if method == "ivf" else emb_all.shape[1],
            knn_edges=int(edges.size),
            far_pairs=int(far.size),
            seconds_neighbours=round(searched - started, 4),
            seconds_far=round(time.perf_counter() - searched, 4),
        )
    return np.stack((keys // base, keys % base), axis=1)


# -- one entry point ----------------------------------------------------------------------


def candidate_blocks(
    mode: str,
    embeddings: np.ndarray,
    ids: np.ndarray,
    exclude: np.ndarray | None,
    rng: np.random.Generator | int | None,
    k: int = 50,
    far_fraction: float = 0.1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    knn_method: str = "auto",
    stats: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """Candidate pairs of one round, in blocks of at most ``block_size``.

    Args:
        mode: ``"exhaustive"``, ``"knn"``, ``"uniform"`` (a uniform random sample of all
            pairs, for estimators whose scores ignore the embedding, so that random pairs
            are truly random on any pool size) or ``"auto"`` (:func:`default_mode`).
        embeddings: (N, D) embeddings of the pool (unused by ``exhaustive``).
        ids: patch ids allowed in pairs.
        exclude: (E, 2) pairs already labelled (queried and implied), or None.
        rng: generator or seed (``knn`` far pairs); None = seed 0.
        k: neighbours per patch (``knn``).
        far_fraction: far pairs per neighbour edge (``knn``).
        block_size: the most pairs per yielded block.
        knn_method: how ``knn`` searches the neighbour graph (:data:`KNN_METHODS`; ``auto``
            is exact up to :data:`EXACT_KNN_MAX_PATCHES` ids, approximate IVF above).
        stats: for ``knn``, a dict :func:`knn_candidates` fills (method, edge and far-pair
            counts, seconds of the neighbour search and of the far pairs).

    Returns:
        An iterator of (B, 2) int64 arrays with ``i < j``.

    Raises:
        ConfigError: unknown ``mode`` (raised at call time, naming the valid modes).
    """
    if mode not in MODES:
        raise ConfigError(f"candidates mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    size = _check_block_size(block_size)
    if mode == "auto":
        mode = default_mode(int(unique_sorted(np.asarray(ids)).size))
    if mode == "exhaustive":
        return exhaustive_blocks(ids, exclude, size)
    if mode == "uniform":
        pairs = uniform_candidates(ids, UNIFORM_SAMPLE, exclude, rng)
        return (pairs[lo : lo + size] for lo in range(0, pairs.shape[0], size))
    pairs = knn_candidates(
        embeddings, ids, k, far_fraction, exclude, rng, method=knn_method, stats=stats
    )
    return (pairs[lo : lo + size] for lo in range(0, pairs.shape[0], size))


def uniform_candidates(
    ids: np.ndarray,
    count: int,
    exclude: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """A uniform random sample of up to ``count`` distinct pairs among ``ids``.

    Draws pairs directly (never enumerates all of them), so it costs O(count) on any pool;
    excluded pairs are removed. Small pools fall back to the exhaustive list.

    Returns:
        (M, 2) int64 pairs with ``i < j``, in random order.
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    ids = unique_sorted(np.asarray(ids, dtype=np.int64))
    m = ids.size
    total = m * (m - 1) // 2
    if total <= count:
        pairs = np.concatenate(list(exhaustive_blocks(ids, exclude))) if total else np.zeros(
            (0, 2), dtype=np.int64
        )
        return pairs[gen.permutation(pairs.shape[0])]
    n = int(ids.max()) + 1
    draw = gen.integers(0, m, size=(int(count * 1.2) + 16, 2))
    draw = draw[draw[:, 0] != draw[:, 1]]
    pairs = np.sort(ids[draw], axis=1)
    keys = pair_keys(pairs, n)
    _, first = np.unique(keys, return_index=True)
    first.sort()
    pairs, keys = pairs[first], keys[first]
    if exclude is not None and len(exclude):
        excluded = np.asarray(exclude, dtype=np.int64).reshape(-1, 2)
        excluded = excluded[excluded.max(axis=1) < n] if excluded.size else excluded
        keep = ~in_sorted(keys, sorted_keys(excluded, n))
        pairs = pairs[keep]
    return pairs[:count]
