"""Candidate pairs: the unlabelled pairs a round may ask about (METHOD.md 3.2).

Two generators behind one entry point, :func:`candidate_blocks`:

- ``exhaustive``: every pair among the allowed ids, yielded block by block so N x N is never
  held in memory; fine for small pools (see :data:`EXHAUSTIVE_MAX_PATCHES`).
- ``knn``: the edges of the K-nearest-neighbour graph of the embeddings (faiss), plus a
  random sample of far pairs; linear in N.

Both drop the excluded pairs (queried and implied). Patch ids are PatchPool row indices and
every pair has ``i < j``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import numpy as np

from anneal_geo.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "EXHAUSTIVE_MAX_PATCHES",
    "MODES",
    "candidate_blocks",
    "count_exhaustive",
    "default_mode",
    "exhaustive_blocks",
    "in_sorted",
    "knn_candidates",
    "pair_keys",
    "sorted_keys",
    "triu_pairs",
    "uniform_candidates",
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


# -- keys and membership ------------------------------------------------------------------


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
    return np.unique(pair_keys(np.sort(arr, axis=1), n))


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
    arr = np.unique(arr.astype(np.int64))  # sorted, unique: pairs come out with i < j
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


def _knn_edge_keys(emb: np.ndarray, ids: np.ndarray, k: int, base: int) -> np.ndarray:
    """Sorted unique keys of the symmetrised k-NN graph over ``emb`` (rows = ``ids``)."""
    import faiss  # heavy: imported where used

    m = emb.shape[0]
    # Thread count: faiss's default (all cores via OpenMP); setting it here would change a
    # process-wide setting behind the caller's back.
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    chunks = []
    for lo in range(0, m, _KNN_QUERY_CHUNK):
        hi = min(lo + _KNN_QUERY_CHUNK, m)
        # k + 1: the query itself is (nearly always) its own first neighbour.
        _, nbr = index.search(emb[lo:hi], k + 1)
        row = np.arange(lo, hi, dtype=np.int64)[:, None]
        nbr = nbr.astype(np.int64, copy=False)
        # Drop self and faiss's -1 padding, then keep the first k left: with duplicate
        # vectors the query may not come first, or may be missing from its own list.
        valid = (nbr != row) & (nbr >= 0)
        keep = valid & (np.cumsum(valid, axis=1) <= k)
        a = np.broadcast_to(row, nbr.shape)[keep]
        b = nbr[keep]
        lo_id, hi_id = ids[np.minimum(a, b)], ids[np.maximum(a, b)]
        chunks.append(np.unique(lo_id * np.int64(base) + hi_id))
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate(chunks))


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
        keys = keys[~np.isin(keys, found)]
        found = np.concatenate((found, keys[:need]))
    return np.sort(found)


def knn_candidates(
    embeddings: np.ndarray,
    ids: np.ndarray,
    k: int = 50,
    far_fraction: float = 0.1,
    exclude: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Pairs of near neighbours in embedding space, plus a few random far pairs.

    The k-nearest-neighbour graph over ``embeddings[ids]`` (faiss exact L2 search) gives
    one edge per (patch, neighbour), symmetrised and deduplicated. Excluded pairs are
    removed, then ``round(far_fraction * edges left)`` random non-edge, non-excluded pairs
    among ``ids`` are added so the estimator also sees pairs the current metric calls far.

    Args:
        embeddings: (N, D) float embeddings of the whole pool (row = patch id).
        ids: patch ids allowed in pairs (sorted and deduplicated here).
        k: neighbours per patch; clipped to ``len(ids) - 1``.
        far_fraction: far pairs per kept edge (>= 0).
        exclude: (E, 2) pairs to leave out, or None.
        rng: generator or seed of the far-pair sample; None = seed 0.

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
    generator = _as_rng(rng)
    m = int(ids_arr.size)
    if m < 2:
        return np.empty((0, 2), dtype=np.int64)
    base = _key_base(ids_arr, exclude)
    emb = np.ascontiguousarray(emb_all[ids_arr], dtype=np.float32)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    edges = _knn_edge_keys(emb, ids_arr, min(int(k), m - 1), base)
    excluded = sorted_keys(exclude, base)
    edges = edges[~in_sorted(edges, excluded)]
    n_far = round(float(far_fraction) * edges.size)
    taken = np.union1d(edges, excluded)
    far = _sample_far_keys(ids_arr, taken, n_far, base, generator)
    keys = np.union1d(edges, far)
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

    Returns:
        An iterator of (B, 2) int64 arrays with ``i < j``.

    Raises:
        ConfigError: unknown ``mode`` (raised at call time, naming the valid modes).
    """
    if mode not in MODES:
        raise ConfigError(f"candidates mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    size = _check_block_size(block_size)
    if mode == "auto":
        mode = default_mode(int(np.unique(np.asarray(ids)).size))
    if mode == "exhaustive":
        return exhaustive_blocks(ids, exclude, size)
    if mode == "uniform":
        pairs = uniform_candidates(ids, UNIFORM_SAMPLE, exclude, rng)
        return (pairs[lo : lo + size] for lo in range(0, pairs.shape[0], size))
    pairs = knn_candidates(embeddings, ids, k, far_fraction, exclude, rng)
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
    ids = np.unique(np.asarray(ids, dtype=np.int64))
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
