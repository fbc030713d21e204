"""Ranking metrics for content-based image retrieval, vectorised over queries.

Every function takes the same two inputs:

- ``relevance``: a (Q, K) boolean matrix; row q lists, in rank order (column 0 = rank 1),
  whether each of the first K archive items returned for query q is relevant to it.
- ``n_relevant``: a (Q,) integer array, the number of relevant items for each query in the
  *whole* archive (not only among the K ranked ones).

Per-query functions return a (Q,) float64 array with ``NaN`` for queries that have no
relevant item in the archive (``n_relevant == 0``): such a query cannot be scored. The
``mean_*`` functions and :func:`mean_over_queries` leave those queries out of the mean, and
:func:`count_unscorable` says how many were left out, so a report can state it.
"""

from __future__ import annotations

import numpy as np

from anneal_geo.errors import ConfigError, DataError

__all__ = [
    "average_precision",
    "count_unscorable",
    "map_at_r",
    "mean_average_precision",
    "mean_over_queries",
    "precision_at_k",
    "r_precision",
]


def _check(relevance: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise the two inputs shared by every metric."""
    rel = np.asarray(relevance)
    if rel.ndim != 2:
        raise DataError(
            f"relevance must be a (queries, ranks) matrix, got shape {rel.shape}; "
            "pass one row of ranked relevance flags per query"
        )
    if rel.dtype != np.bool_:
        if rel.size and not np.isin(rel, (0, 1)).all():
            raise DataError("relevance must hold only 0/1 or True/False flags")
        rel = rel.astype(bool)
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (rel.shape[0],):
        raise DataError(
            f"n_relevant has shape {n_rel.shape} but relevance has {rel.shape[0]} query rows; "
            "pass one count per query"
        )
    if (
        n_rel.size
        and n_rel.dtype.kind not in "iu"
        and not (np.all(np.isfinite(n_rel)) and np.all(n_rel == np.round(n_rel)))
    ):
        raise DataError("n_relevant must hold whole numbers (relevant items per query)")
    n_rel = n_rel.astype(np.int64)
    found = rel.sum(axis=1)
    if np.any(n_rel < found):
        bad = int(np.flatnonzero(n_rel < found)[0])
        raise DataError(
            f"query {bad}: n_relevant={int(n_rel[bad])} is smaller than the {int(found[bad])} "
            "relevant items already in its ranking; n_relevant must count the whole archive"
        )
    return rel, n_rel


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{name}={k!r} is not a positive whole number of ranks; use e.g. 20")
    return int(k)


def _precision_at_each_rank(rel: np.ndarray) -> np.ndarray:
    """(Q, K) float64: precision of the top i items at every rank i = 1..K."""
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    return np.cumsum(rel, axis=1, dtype=np.float64) / ranks


def _scorable(values: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    """Mark queries without any relevant archive item as NaN (they cannot be scored)."""
    return np.where(n_rel > 0, values, np.nan)


def average_precision(
    relevance: np.ndarray, n_relevant: np.ndarray, k: int | None = None
) -> np.ndarray:
    """Average precision of each query, over the top k ranks or the whole ranking.

    Convention: ``AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)``, where ``P@i`` is the
    precision of the top i items and ``rel_i`` is 1 when the item at rank i is relevant. The
    normaliser ``min(k, n_relevant)`` is the most relevant items the top k could hold, so a
    perfect top k scores 1 even when the archive has more relevant items than k (the
    convention of most remote-sensing retrieval papers). With ``k=None`` the sum runs over
    all K ranked items and the normaliser is ``n_relevant``: this is the full AP when the
    ranking covers the whole archive (see :func:`anneal_geo.retrieval.index.rank_all`); on a
    truncated ranking it is a lower bound (relevant items beyond rank K count as missed).

    Args:
        relevance: (Q, K) bool, ranked relevance flags per query.
        n_relevant: (Q,) int, relevant items per query in the whole archive.
        k: the cut-off rank, or None for the whole ranking. A k larger than K is allowed
            only when the ranking then holds every relevant item (a ranking of the whole
            archive when the archive has fewer than k items).

    Returns:
        (Q,) float64 AP in [0, 1]; NaN where ``n_relevant == 0``.
    """
    rel, n_rel = _check(relevance, n_relevant)
    if k is None:
        cut = rel.shape[1]
        norm = n_rel
    else:
        k = _check_k(k)
        if k > rel.shape[1] and np.any(n_rel > rel.shape[1]):
            raise ConfigError(
                f"k={k} exceeds the {rel.shape[1]} ranks given while some queries have more "
                "relevant items than that; rank more of the archive (e.g. rank_all)"
            )
        cut = min(k, rel.shape[1])
        norm = np.minimum(k, n_rel)
    top = rel[:, :cut]
    gains = (_precision_at_each_rank(top) * top).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = gains / norm
    return _scorable(ap, n_rel)


def precision_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Precision of each query's top k: relevant items among the first k, divided by k.

    Args:
        relevance: (Q, K) bool ranked relevance flags, with K >= k.
        n_relevant: (Q,) int relevant items per query in the archive (only used to mark
            unscorable queries).
        k: the cut-off rank; must not exceed K (rank at least k items, or lower k when the
            archive is smaller than k).

    Returns:
        (Q,) float64 in [0, 1]; NaN where ``n_relevant == 0``.
    """
    rel, n_rel = _check(relevance, n_relevant)
    k = _check_k(k)
    if k > rel.shape[1]:
        raise ConfigError(
            f"k={k} exceeds the {rel.shape[1]} ranks given; rank at least k archive items "
            "or use a smaller k"
        )
    return _scorable(rel[:, :k].sum(axis=1) / float(k), n_rel)


def _check_covers_r(rel: np.ndarray, n_rel: np.ndarray, what: str) -> None:
    if rel.shape[0] and int(n_rel.max(initial=0)) > rel.shape[1]:
        raise ConfigError(
            f"{what} needs the top R ranks of every query, but a query has "
            f"R={int(n_rel.max())} relevant items and only {rel.shape[1]} ranks were given; "
            "rank the whole archive (rank_all)"
        )


def r_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """R-precision of each query: the precision of its top R, with R = ``n_relevant``.

    Args:
        relevance: (Q, K) bool ranked relevance flags; K must be at least max(R).
        n_relevant: (Q,) int, R for each query.

    Returns:
        (Q,) float64 in [0, 1]; NaN where R == 0.
    """
    rel, n_rel = _check(relevance, n_relevant)
    _check_covers_r(rel, n_rel, "R-precision")
    within_r = np.arange(rel.shape[1])[None, :] < n_rel[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (rel & within_r).sum(axis=1) / n_rel
    return _scorable(values, n_rel)


def map_at_r(relevance: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """MAP@R of each query (Musgrave, Belongie and Lim, "A Metric Learning Reality Check",
    ECCV 2020): ``(1/R) * sum_{i<=R} P@i * rel_i`` with R = ``n_relevant``.

    It is AP restricted to the top R ranks and normalised by R, so a query scores 1 only if
    its R relevant items fill exactly the first R ranks.

    Args:
        relevance: (Q, K) bool ranked relevance flags; K must be at least max(R).
        n_relevant: (Q,) int, R for each query.

    Returns:
        (Q,) float64 in [0, 1]; NaN where R == 0.
    """
    rel, n_rel = _check(relevance, n_relevant)
    _check_covers_r(rel, n_rel, "MAP@R")
    within_r = np.arange(rel.shape[1])[None, :] < n_rel[:, None]
    hits = rel & within_r
    gains = (_precision_at_each_rank(rel) * hits).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = gains / n_rel
    return _scorable(values, n_rel)


def mean_over_queries(per_query: np.ndarray) -> float:
    """Mean of a per-query metric over the scorable queries (the non-NaN entries).

    Returns:
        the mean as a float; NaN when no query is scorable.
    """
    values = np.asarray(per_query, dtype=np.float64)
    valid = ~np.isnan(values)
    if not valid.any():
        return float("nan")
    return float(values[valid].mean())


def count_unscorable(n_relevant: np.ndarray) -> int:
    """How many queries have no relevant item in the archive (left out of every mean)."""
    return int((np.asarray(n_relevant) <= 0).sum())


def mean_average_precision(
    relevance: np.ndarray, n_relevant: np.ndarray, k: int | None = None
) -> float:
    """mAP (k=None, full ranking) or mAP@k: :func:`average_precision` averaged over the
    queries that have at least one relevant archive item.

    Returns:
        the mean as a float; NaN when no query is scorable.
    """
    return mean_over_queries(average_precision(relevance, n_relevant, k))
