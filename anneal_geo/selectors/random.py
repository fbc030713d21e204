"""The ``random`` selector: k pairs drawn uniformly from the short-list (the baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np

from anneal_geo.selectors.base import Selector

__all__ = ["RandomSelector"]


class RandomSelector(Selector):
    """k distinct rows drawn uniformly at random with the engine's generator.

    Args:
        seed: seed used when the engine passes no generator.
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
        """Return ``k`` distinct indices drawn without replacement."""
        return rng.choice(uncertainty.shape[0], size=k, replace=False).astype(np.int64)
