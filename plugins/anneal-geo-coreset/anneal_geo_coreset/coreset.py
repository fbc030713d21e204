"""``coreset``: k-center greedy on the pair descriptors (an anneal-geo selector plugin).

The core-set approach to active learning (Sener and Savarese, ICLR 2018) picks the points
that best *cover* the candidates: each new pick is the candidate farthest from every pick so
far, which keeps the largest distance from any candidate to its nearest pick (the covering
radius) within twice the optimum. Here the candidates are the engine's short-list of
uncertain pairs, described by ``[f_i + f_j, |f_i - f_j|]``; an optional weight favours the
more uncertain of two equally far pairs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from anneal_geo.errors import ConfigError
from anneal_geo.selectors.base import Selector

__all__ = ["CoresetSelector", "covering_radius", "k_center_greedy"]

_STARTS = ("uncertain", "random")


def _uncertainty_rank(uncertainty: np.ndarray) -> np.ndarray:
    """Rank-normalised uncertainty in (0, 1]: 1 for the most uncertain, scale-free."""
    m = uncertainty.shape[0]
    order = np.argsort(-uncertainty, kind="stable")
    rank = np.empty(m, dtype=np.float64)
    rank[order] = np.arange(m, 0, -1) / m
    return rank


def k_center_greedy(
    points: np.ndarray,
    k: int,
    first: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy k-center: start at ``first``, then repeatedly take the farthest point.

    With ``weights``, the next pick maximises ``weight * distance to the nearest pick``
    instead. Ties go to the lower index. Points already picked are never picked again, so
    duplicates still give ``k`` distinct rows.

    Args:
        points: (M, F) float points.
        k: how many, ``1 <= k <= M``.
        first: the first pick.
        weights: optional (M,) positive weights.

    Returns:
        (k,) int64 row indices in the order picked.
    """
    x = np.asarray(points, dtype=np.float64)
    m = x.shape[0]
    picked = np.empty(k, dtype=np.int64)
    picked[0] = first
    nearest = np.sum((x - x[first]) ** 2, axis=1)
    taken = np.zeros(m, dtype=bool)
    taken[first] = True
    for step in range(1, k):  # k picks, each vectorised over the M points
        gain = np.sqrt(nearest) if weights is None else np.sqrt(nearest) * weights
        gain[taken] = -np.inf
        nxt = int(np.argmax(gain))
        picked[step] = nxt
        taken[nxt] = True
        np.minimum(nearest, np.sum((x - x[nxt]) ** 2, axis=1), out=nearest)
    return picked


def covering_radius(points: np.ndarray, picked: np.ndarray) -> float:
    """The largest distance from any point to its nearest picked point."""
    x = np.asarray(points, dtype=np.float64)
    centres = x[np.asarray(picked)]
    # Differences, not the expansion |a|^2 + |b|^2 - 2ab: that cancels badly, so a point
    # that is a picked point would get a distance of ~1e-8 instead of 0. One picked point
    # at a time keeps memory at (M, D).
    nearest = np.full(len(x), np.inf)
    for centre in centres:
        np.minimum(nearest, np.linalg.norm(x - centre, axis=1), out=nearest)
    return float(nearest.max())


class CoresetSelector(Selector):
    """k-center greedy (core-set) on the pair descriptors, optionally weighted by uncertainty.

    The first pick is the most uncertain pair (``start="uncertain"``, ties to the lower
    index) or one drawn with the engine's generator (``start="random"``); each further
    pick is the pair farthest (Euclidean, in descriptor space) from all picks so far,
    its distance multiplied by ``(1 - weight) + weight * r`` where r in (0, 1] is the
    pair's uncertainty rank (1 = most uncertain). ``weight=0`` is the plain core-set;
    ``weight=1`` trades coverage for uncertainty most. The result is ordered most uncertain
    first, as the built-in selectors do, so a person sees the hardest questions first.

    Args:
        seed: seed used when the engine passes no generator (only ``start="random"``
            draws).
        weight: uncertainty weight in [0, 1].
        start: ``"uncertain"`` or ``"random"``.
        **options: passed on to :class:`~anneal_geo.selectors.base.Selector`.

    Raises:
        ConfigError: ``weight`` outside [0, 1] or an unknown ``start``.
    """

    contract_version: ClassVar[int] = 1

    def __init__(
        self, seed: int = 0, weight: float = 0.5, start: str = "uncertain", **options: Any
    ) -> None:
        try:
            weight_value = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(
                f"coreset selector: weight must be a number, got {weight!r}"
            ) from None
        if not 0.0 <= weight_value <= 1.0:
            raise ConfigError(f"coreset selector: weight must lie in [0, 1], got {weight!r}")
        if start not in _STARTS:
            raise ConfigError(
                f"coreset selector: start must be one of {', '.join(_STARTS)}, got {start!r}"
            )
        super().__init__(seed, weight=weight_value, start=start, **options)
        self.weight = weight_value
        self.start = start

    def select(
        self,
        descriptors: np.ndarray,
        uncertainty: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Return ``k`` distinct rows chosen by (weighted) k-center greedy."""
        rank = _uncertainty_rank(uncertainty)
        if self.start == "random":
            first = int(rng.integers(descriptors.shape[0]))
        else:
            first = int(np.argmax(rank))
        weights = None if self.weight == 0.0 else (1.0 - self.weight) + self.weight * rank
        picked = k_center_greedy(descriptors, k, first, weights)
        # Most uncertain first (rank is unique per row, so this order has no ties).
        return picked[np.argsort(-rank[picked], kind="stable")]
