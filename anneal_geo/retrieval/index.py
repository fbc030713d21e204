"""Exact nearest-neighbour search over an archive of embeddings: faiss for the k nearest, a
matrix product and a sort for whole-archive rankings.

faiss is imported inside the functions so that importing this module stays light.
"""

from __future__ import annotations

import numpy as np

from anneal_geo.errors import ConfigError, DataError

__all__ = ["average_expansion", "check_expansion", "exact_search", "expand_queries", "rank_all"]


def _as_matrix(values: np.ndarray, what: str) -> np.ndarray:
    """faiss needs C-contiguous float32 (N, D) matrices with finite values."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise DataError(f"{what} must be an (N, D) matrix, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "fiub":
        raise DataError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise DataError(f"{what} has {bad} rows with NaN or infinite values; re-embed those")
    return arr


def _check_shapes(archive: np.ndarray, queries: np.ndarray) -> None:
    """A non-empty archive, and queries of its dimension."""
    if archive.shape[0] == 0:
        raise DataError("the archive is empty; add at least one embedding to search")
    if queries.shape[1] != archive.shape[1]:
        raise DataError(
            f"query embeddings have {queries.shape[1]} dimensions but the archive has "
            f"{archive.shape[1]}; embed both with the same backbone"
        )


def exact_search(
    archive_embeddings: np.ndarray, query_embeddings: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest archive items of each query, by exact Euclidean distance.

    Args:
        archive_embeddings: (N, D) archive embeddings; row index = archive position.
        query_embeddings: (Q, D) query embeddings, same D.
        k: neighbours per query; clipped to N (asking for more than the archive holds
            returns the whole archive, ranked).

    Returns:
        (distances, indices): (Q, min(k, N)) float32 Euclidean distances, ascending along
        each row, and (Q, min(k, N)) int64 positions in ``archive_embeddings``. Equal
        distances come back in faiss's order.
    """
    import faiss

    archive = _as_matrix(archive_embeddings, "archive embeddings")
    queries = _as_matrix(query_embeddings, "query embeddings")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} is not a positive whole number of neighbours")
    _check_shapes(archive, queries)
    k = min(int(k), archive.shape[0])
    if queries.shape[0] == 0:
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    index = faiss.IndexFlatL2(archive.shape[1])
    index.add(archive)
    squared, indices = index.search(queries, k)
    # faiss returns squared L2 computed as |x|^2 + |y|^2 - 2xy, which can dip below 0 by
    # rounding; clip before the square root so identical vectors are at distance 0.
    distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32, copy=False)
    return distances, indices.astype(np.int64, copy=False)


def rank_all(
    archive_embeddings: np.ndarray, query_embeddings: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the whole archive for each query (as needed for full mAP and MAP@R).

    One matrix product and a sort per row: for k = N a full sort is faster than faiss's
    k-selection heap (about 3x on 800 x 3,200 on 2 cores). Distances are
    ``sqrt(max(|x|^2 + |y|^2 - 2 x.y, 0))`` in float32, as :func:`exact_search` computes them;
    equal distances (duplicate patches) come in a fixed order that is not archive order.

    Returns:
        (distances, indices), both (Q, N): float32 distances ascending along each row and
        int64 archive positions.

    Raises:
        DataError: an empty or non-finite archive, or queries of another dimension.
    """
    archive = _as_matrix(archive_embeddings, "archive embeddings")
    queries = _as_matrix(query_embeddings, "query embeddings")
    _check_shapes(archive, queries)
    squared = queries @ archive.T
    squared *= -2.0
    squared += np.einsum("ij,ij->i", queries, queries)[:, None]
    squared += np.einsum("ij,ij->i", archive, archive)[None, :]
    order = np.argsort(squared, axis=1)
    distances = np.sqrt(np.maximum(np.take_along_axis(squared, order, axis=1), 0.0))
    return distances.astype(np.float32, copy=False), order.astype(np.int64, copy=False)


def average_expansion(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion: each query averaged with its neighbours' embeddings.

    Args:
        queries: (Q, D) query embeddings.
        neighbours: (Q, n, D) embeddings of each query's n nearest archive items.

    Returns:
        (Q, D) float32 ``(q + x_1 + ... + x_n) / (n + 1)``. On unit vectors (the session
        embeddings) ranking by Euclidean distance to it ranks by cosine similarity to the
        normalised sum, as average query expansion does.
    """
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(neighbours, dtype=np.float64)
    return ((q + x.sum(axis=1)) / (1 + x.shape[1])).astype(np.float32)


def check_expansion(n: object) -> int:
    """``n`` as a query expansion: a whole number of neighbours, 0 (off) or more.

    Raises:
        ConfigError: anything else, named as the ``query_expansion`` setting.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"query_expansion={n!r} is not a whole number of neighbours (0 = off)")
    return int(n)


def expand_queries(
    archive_embeddings: np.ndarray, query_embeddings: np.ndarray, n: int
) -> np.ndarray:
    """The queries after average query expansion with their ``n`` nearest archive items
    (:func:`average_expansion`; n = 0 returns them unchanged, as float32).

    Raises:
        ConfigError: ``n`` is not a whole number of at least 0.
        DataError: as :func:`exact_search`.
    """
    n = check_expansion(n)
    queries = _as_matrix(query_embeddings, "query embeddings")
    if n == 0 or queries.shape[0] == 0:
        return queries
    archive = _as_matrix(archive_embeddings, "archive embeddings")
    _, nearest = exact_search(archive, queries, int(n))
    return average_expansion(queries, archive[nearest])
