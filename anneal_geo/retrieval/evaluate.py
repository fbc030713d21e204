"""Retrieval evaluation of an embedding: rank an archive for held-out queries and score it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval.index import expand_queries, rank_all
from anneal_geo.retrieval.metrics import (
    average_precision,
    count_unscorable,
    map_at_r,
    mean_over_queries,
    precision_at_k,
)
from anneal_geo.retrieval.split import _multi_hot

__all__ = ["evaluate", "relevance_matrix"]

# Bound on the (queries x archive) entries ranked at once, to keep memory flat (~50 MB).
_BLOCK_ENTRIES = 4_000_000


def _ids(values: np.ndarray | Sequence[int], what: str, n: int) -> np.ndarray:
    ids = np.asarray(values)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise DataError(
            f"{what} must be a 1-D array of integer patch ids, got {ids.dtype} {ids.shape}"
        )
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f"{what} holds ids outside 0..{n - 1} (the {n} embedded patches)")
    if np.unique(ids).size != ids.size:
        raise DataError(f"{what} lists some patch ids more than once")
    return ids


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim not in (1, 2) or lab.shape[0] != n:
        raise DataError(
            f"labels have shape {lab.shape} for {n} embeddings; pass (N,) class indices or "
            "(N, L) bool multi-hot labels, one row per embedding"
        )
    if lab.ndim == 2:
        return _multi_hot(lab)
    if lab.size and lab.dtype.kind not in "iub":
        raise DataError(f"single-label class ids must be integers, got dtype {lab.dtype}")
    return lab.astype(np.int64)


def relevance_matrix(query_labels: np.ndarray, archive_labels: np.ndarray) -> np.ndarray:
    """Which archive items are relevant to which query.

    Args:
        query_labels: (Q,) int class ids or (Q, L) bool multi-hot labels.
        archive_labels: (A,) or (A, L), same kind.

    Returns:
        (Q, A) bool: same class (single-label) or at least one shared label (multi-label).
    """
    q = np.asarray(query_labels)
    a = np.asarray(archive_labels)
    if q.ndim == 1:
        return q[:, None] == a[None, :]
    # Counts of shared labels by a matrix product: exact in float32 below 2**24 labels.
    shared = q.astype(np.float32) @ a.astype(np.float32).T
    return shared > 0.5


def _check_ks(ks: Sequence[int], map_k: int) -> tuple[list[int], int]:
    def positive(value: int, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} is not a positive whole number of ranks")
        return int(value)

    return [positive(k, "ks entry") for k in ks], positive(map_k, "map_k")


def evaluate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    archive_ids: np.ndarray | Sequence[int],
    query_ids: np.ndarray | Sequence[int],
    ks: Sequence[int] = (10, 20, 50),
    map_k: int = 20,
    query_expansion: int = 0,
) -> dict[str, float]:
    """Retrieval quality of ``embeddings``: each query ranks the archive by Euclidean distance.

    Relevant means the same class (single-label) or at least one shared label (multi-label).
    A query is never part of the archive (overlapping ids are an error). Queries without
    any relevant archive item cannot be scored: they are left out of every mean and counted
    in ``n_unscorable_queries``. When the archive holds fewer than k items, ``p@k`` and
    ``map@k`` use k = archive size. Distances are taken as given, so pass L2-normalised
    embeddings if that is the metric space to evaluate.

    Args:
        embeddings: (N, D) embeddings of all patches (archive and queries).
        labels: (N,) int class ids, or (N, L) bool multi-hot labels.
        archive_ids: patch ids (rows of ``embeddings``) forming the archive.
        query_ids: patch ids of the held-out queries, disjoint from the archive.
        ks: cut-offs of the precision metrics ``p@k``.
        map_k: cut-off of ``map@{map_k}`` (AP@k normalised by min(k, relevant items)).
        query_expansion: n > 0 first averages each query with its n nearest archive items
            (average query expansion, :func:`~anneal_geo.retrieval.index.expand_queries`), as
            the retrieval index searches; 0 ranks by the query embeddings themselves.

    Returns:
        ``{"map@{map_k}", "map", "p@{k}" for k in ks, "map@r", "n_queries",
        "n_unscorable_queries"}``; ``map`` is the full-ranking mAP, ``map@r`` is MAP@R
        (Musgrave et al. 2020), ``n_queries`` counts the queries the means are over.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise DataError(f"embeddings must be an (N, D) matrix, got shape {emb.shape}")
    n = emb.shape[0]
    lab = _labels(labels, n)
    archive = _ids(archive_ids, "archive_ids", n)
    queries = _ids(query_ids, "query_ids", n)
    overlap = np.intersect1d(archive, queries)
    if overlap.size:
        shown = ", ".join(str(i) for i in overlap[:5])
        raise DataError(
            f"patch ids {shown} are both archive and query ids; a query must never be in the "
            "archive (use stratified_split)"
        )
    if archive.size == 0 or queries.size == 0:
        raise DataError(
            f"need at least one archive and one query patch, got {archive.size} and "
            f"{queries.size}; lower or raise query_fraction, or label more patches"
        )
    cutoffs, map_k = _check_ks(ks, map_k)

    n_archive = archive.size
    archive_emb = emb[archive]
    query_emb = expand_queries(archive_emb, emb[queries], query_expansion)
    archive_lab = lab[archive]
    per_query: dict[str, list[np.ndarray]] = {"ap_k": [], "ap": [], "map_r": []}
    per_query.update({f"p{k}": [] for k in cutoffs})
    n_rel_all: list[np.ndarray] = []
    block = max(1, _BLOCK_ENTRIES // n_archive)
    for start in range(0, queries.size, block):
        ids = queries[start : start + block]
        _, order = rank_all(archive_emb, query_emb[start : start + block])
        relevant = relevance_matrix(lab[ids], archive_lab)
        n_rel = relevant.sum(axis=1)
        ranked = np.take_along_axis(relevant, order, axis=1)
        per_query["ap_k"].append(average_precision(ranked, n_rel, map_k))
        per_query["ap"].append(average_precision(ranked, n_rel))
        per_query["map_r"].append(map_at_r(ranked, n_rel))
        for k in cutoffs:
            per_query[f"p{k}"].append(precision_at_k(ranked, n_rel, min(k, n_archive)))
        n_rel_all.append(n_rel)

    def mean(key: str) -> float:
        return mean_over_queries(np.concatenate(per_query[key]))

    n_rel = np.concatenate(n_rel_all)
    result: dict[str, float] = {f"map@{map_k}": mean("ap_k"), "map": mean("ap")}
    result.update({f"p@{k}": mean(f"p{k}") for k in cutoffs})
    result["map@r"] = mean("map_r")
    unscorable = count_unscorable(n_rel)
    result["n_queries"] = float(n_rel.size - unscorable)
    result["n_unscorable_queries"] = float(unscorable)
    return result
