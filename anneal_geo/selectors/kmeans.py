"""The ``kmeans`` selector: clustering-based diversity, ANNEAL's default (METHOD.md section 3.5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from anneal_geo.errors import ConfigError
from anneal_geo.selectors.base import Selector
from anneal_geo.selectors.topk import most_uncertain

__all__ = ["KMeansSelector", "kmeans_plus_plus"]

_PICKS = ("uncertain", "centroid")

#: Below this many multiply-adds per k-means iteration (M * k * F) faiss runs on one
#: thread: OpenMP start-up then costs more than it saves, and on a busy machine two
#: spinning threads made a 1,000-point short-list 25 times slower (measured).
_SINGLE_THREAD_WORK = 200_000_000


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability proportional to the squared
    distance to the nearest centre so far (Arthur and Vassilvitskii, 2007).

    faiss seeds k-means with k rows drawn uniformly; on a short-list whose clusters are
    about equally large that often puts two seeds in one cluster and none in another, and
    Lloyd iterations cannot undo it (about half the time on five separated blobs). This
    seeding spreads the centres first.

    Args:
        x: (M, F) float32 points.
        k: number of centres, ``1 <= k <= M``.
        rng: the random source.

    Returns:
        (k, F) float32 initial centres (rows of ``x``).
    """
    m = x.shape[0]
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(m)
    nearest = np.sum((x - x[chosen[0]]) ** 2, axis=1, dtype=np.float64)
    for c in range(1, k):
        total = nearest.sum()
        # All points already sit on a centre (duplicates): any further choice is as good.
        chosen[c] = rng.choice(m, p=nearest / total) if total > 0 else rng.integers(m)
        np.minimum(nearest, np.sum((x - x[chosen[c]]) ** 2, axis=1, dtype=np.float64), out=nearest)
    return np.ascontiguousarray(x[chosen])


def _first_per_cluster(assignment: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The first row of each cluster in ``order`` (rows sorted best first within clusters)."""
    labels = assignment[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = labels[1:] != labels[:-1]
    return order[first]


class KMeansSelector(Selector):
    """k-means (faiss) on the pair descriptors with k clusters, one pair from each cluster.

    k-means is seeded with k-means++ drawn from the engine's generator (see
    :func:`kmeans_plus_plus`), then refined by faiss for ``niter`` iterations.

    From each cluster the selector takes the most uncertain member (``pick="uncertain"``,
    ANNEAL's choice) or the member nearest the centroid (``pick="centroid"``); ties go to
    the lower index. When fewer than k clusters end up non-empty (duplicate descriptors,
    or k-means leaving a centroid without members), the remaining slots are filled with
    the most uncertain rows not chosen yet, so exactly k distinct rows always come back.
    The result is ordered most uncertain first.

    Args:
        seed: seed used when the engine passes no generator.
        niter: k-means iterations.
        pick: ``"uncertain"`` or ``"centroid"``.
        **options: passed on to :class:`~anneal_geo.selectors.base.Selector`.

    Raises:
        ConfigError: ``niter`` < 1 or an unknown ``pick``.
    """

    def __init__(
        self, seed: int = 0, niter: int = 20, pick: str = "uncertain", **options: Any
    ) -> None:
        if int(niter) < 1:
            raise ConfigError(f"kmeans selector: niter must be >= 1, got {niter}")
        if pick not in _PICKS:
            raise ConfigError(
                f"kmeans selector: pick must be one of {', '.join(_PICKS)}, got {pick!r}"
            )
        super().__init__(seed, niter=int(niter), pick=pick, **options)
        self.niter = int(niter)
        self.pick = pick

    def select(
        self,
        descriptors: np.ndarray,
        uncertainty: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Return ``k`` distinct rows, one per k-means cluster where clusters allow."""
        m = descriptors.shape[0]
        if k >= m:
            return most_uncertain(uncertainty, m)
        import faiss

        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        kmeans = faiss.Kmeans(
            x.shape[1],
            k,
            niter=self.niter,
            # Only used by faiss to subsample very large inputs; we pass the seeds below.
            seed=int(rng.integers(0, 2**31 - 1)),
            verbose=False,
            # Short-lists are only ~10 points per cluster by design (h = 10 b), far below
            # faiss's 39-per-centroid advice; the warning would fire every round for nothing.
            min_points_per_centroid=1,
        )
        init = kmeans_plus_plus(x, k, rng)
        threads = faiss.omp_get_max_threads()
        if x.shape[0] * k * x.shape[1] < _SINGLE_THREAD_WORK:
            faiss.omp_set_num_threads(1)
        try:
            kmeans.train(x, init_centroids=init)
            dist, assign = kmeans.index.search(x, 1)
        finally:
            faiss.omp_set_num_threads(threads)
        assignment = assign[:, 0]
        rows = np.arange(m)
        if self.pick == "uncertain":
            # lexsort: last key is primary -> by cluster, then most uncertain, then index.
            order = np.lexsort((rows, -uncertainty, assignment))
        else:
            order = np.lexsort((rows, dist[:, 0], assignment))
        chosen = _first_per_cluster(assignment, order)
        if chosen.size < k:
            rest = np.setdiff1d(rows, chosen, assume_unique=True)
            extra = rest[most_uncertain(uncertainty[rest], k - chosen.size)]
            chosen = np.concatenate([chosen, extra])
        # Most uncertain first, so a human sees the hardest questions first.
        return chosen[most_uncertain(uncertainty[chosen], chosen.size)].astype(np.int64)
