"""The ``random`` estimator: uniform noise as uncertainty, the baseline of the ablations."""

from __future__ import annotations

from typing import Any

import numpy as np

from anneal_geo.estimators.base import Estimator

__all__ = ["RandomEstimator"]


class RandomEstimator(Estimator):
    """Uncertainty u ~ U(0, 1), independent of the embeddings.

    Call ``c`` (counting from 0) draws from ``np.random.default_rng((seed, c))``, so
    successive rounds get different draws while a run with the same seed repeats exactly.
    :attr:`calls` is that counter; a resumed session can set it to the number of rounds
    already scored to continue the same stream.

    Args:
        seed: seed of the draws.
        **options: passed on to :class:`~anneal_geo.estimators.base.Estimator`.
    """

    uses_embeddings = False

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self.calls = 0

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Return (M,) float64 draws in [0, 1)."""
        # (seed, call) as a SeedSequence entropy tuple: unlike seed + call, seed 0 call 1
        # and seed 1 call 0 do not collide.
        rng = np.random.default_rng((self.seed, self.calls))
        self.calls += 1
        return rng.random(size=(pairs.shape[0],))
