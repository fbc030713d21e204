"""Class-stratified archive/query split for retrieval evaluation."""

from __future__ import annotations

import numpy as np

from anneal_geo.errors import ConfigError, DataError

__all__ = ["strata", "stratified_split"]


def strata(labels: np.ndarray) -> np.ndarray:
    """The stratum of every patch: its class, or for multi-label data its rarest label.

    Multi-label patches are stratified by their *rarest* label (fewest patches in the whole
    set; ties go to the lower label index), so that rare labels reach both the archive and
    the queries; frequent labels are spread by the sheer number of patches carrying them.
    Patches with no label at all form one extra stratum.

    Args:
        labels: (N,) integer class ids, or (N, L) bool multi-hot labels.

    Returns:
        (N,) int64 stratum ids in 0..S-1.
    """
    lab = np.asarray(labels)
    if lab.ndim == 1:
        if lab.size and lab.dtype.kind not in "iub":
            raise DataError(
                f"single-label class ids must be integers, got dtype {lab.dtype}; "
                "pass (N,) class indices or (N, L) bool multi-hot labels"
            )
        return np.unique(lab, return_inverse=True)[1].astype(np.int64).reshape(-1)
    if lab.ndim == 2:
        hot = _multi_hot(lab)
        freq = hot.sum(axis=0)
        # Rarest label first: a huge count where the label is absent hides it from argmin.
        if hot.shape[1] == 0:
            return np.zeros(hot.shape[0], dtype=np.int64)
        masked = np.where(hot, freq[None, :], np.iinfo(np.int64).max)
        rarest = np.where(hot.any(axis=1), np.argmin(masked, axis=1), -1)
        return np.unique(rarest, return_inverse=True)[1].astype(np.int64).reshape(-1)
    raise DataError(
        f"labels have shape {lab.shape}; pass (N,) class indices or (N, L) bool multi-hot labels"
    )


def _multi_hot(lab: np.ndarray) -> np.ndarray:
    if lab.dtype == np.bool_:
        return lab
    if lab.size and (lab.dtype.kind not in "iuf" or not np.isin(lab, (0, 1)).all()):
        raise DataError("multi-hot labels must hold only 0/1 or True/False")
    return lab.astype(bool)


def stratified_split(
    labels: np.ndarray, query_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split patches into a retrieval archive and held-out queries, stratified by class.

    Each stratum (class; for multi-label data the rarest label, see :func:`strata`) sends
    about ``query_fraction`` of its patches to the queries. The per-stratum counts are
    apportioned by largest remainder, so the total is ``round(N * query_fraction)`` before
    the coverage rule: a stratum with at least 2 patches always keeps one in the archive
    (so its queries have something to find), and a stratum with a single patch keeps it in
    the archive (as a query it could never be scored). Which patches become queries is
    drawn at random, reproducibly from ``seed``.

    Args:
        labels: (N,) integer class ids, or (N, L) bool multi-hot labels.
        query_fraction: share of patches held out as queries, strictly between 0 and 1.
        seed: seed of the random draw.

    Returns:
        (archive_ids, query_ids): sorted, disjoint int64 arrays of patch ids covering 0..N-1.
    """
    fraction = float(query_fraction)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"query_fraction={query_fraction!r} must lie strictly between 0 and 1 "
            "(e.g. 0.2 for an 80/20 archive/query split)"
        )
    stratum = strata(labels)
    n = stratum.shape[0]
    if n < 2:
        raise DataError(f"cannot split {n} patch(es) into an archive and queries; need at least 2")
    rng = np.random.default_rng(seed)
    sizes = np.bincount(stratum).astype(np.int64)

    # Largest-remainder apportionment of round(N * fraction) queries over the strata;
    # equal remainders are ordered by a seeded random key so no stratum is always favoured.
    ideal = sizes * fraction
    n_query = np.floor(ideal).astype(np.int64)
    spare = max(round(n * fraction) - int(n_query.sum()), 0)
    tie_break = rng.random(size=int(sizes.shape[0]))
    order = np.lexsort((tie_break, -(ideal - n_query)))
    n_query[order[:spare]] += 1
    n_query = np.minimum(n_query, np.maximum(sizes - 1, 0))

    # Rank the patches of each stratum in a random order; the first n_query become queries.
    by_stratum = np.lexsort((rng.random(size=int(n)), stratum))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.arange(n) - starts[stratum[by_stratum]]
    is_query = np.zeros(n, dtype=bool)
    is_query[by_stratum] = position < n_query[stratum[by_stratum]]
    archive_ids = np.flatnonzero(~is_query).astype(np.int64)
    query_ids = np.flatnonzero(is_query).astype(np.int64)
    return archive_ids, query_ids
