"""The ``topk`` selector: the k most uncertain pairs, no diversity (the estimator-only ablation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from anneal_geo.selectors.base import Selector

__all__ = ["TopKSelector", "most_uncertain"]


def most_uncertain(uncertainty: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, most uncertain first; ties go to the lower index.

    Args:
        uncertainty: (M,) scores, higher = more uncertain.
        k: how many, ``0 <= k <= M``.

    Returns:
        (k,) int64 indices.
    """
    # A stable sort of the negated scores keeps equal scores in index order, so the
    # result never depends on the sort algorithm or the platform.
    order = np.argsort(-np.asarray(uncertainty, dtype=np.float64), kind="stable")
    return order[:k].astype(np.int64, copy=False)


class TopKSelector(Selector):
    """The k most uncertain pairs (no diversity); ties are broken by the lower index.

    Args:
        seed: unused (the choice is deterministic); kept for the common constructor.
        **options: passed on to :class:`~anneal_geo.selectors.base.Selector`.
    """

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)

    def select(
        self,
        descriptors: np.ndarray,
        uncertainty: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Return the indices of the ``k`` most uncertain rows, most uncertain first."""
        return most_uncertain(uncertainty, k)
