"""Uncertainty estimators: how uncertain is each candidate pair?

The classes are imported on first access, so ``import anneal_geo.estimators`` stays
light; the engine reaches them through the plugin registry (``anneal_geo.plugins``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BCGUEEstimator",
    "Estimator",
    "MGUEEstimator",
    "RandomEstimator",
    "balanced_threshold",
    "pair_distances",
]

_EXPORTS: dict[str, str] = {
    "BCGUEEstimator": "anneal_geo.estimators.bcgue",
    "Estimator": "anneal_geo.estimators.base",
    "MGUEEstimator": "anneal_geo.estimators.mgue",
    "RandomEstimator": "anneal_geo.estimators.random",
    "balanced_threshold": "anneal_geo.estimators.mgue",
    "pair_distances": "anneal_geo.estimators.mgue",
}

if TYPE_CHECKING:
    from anneal_geo.estimators.base import Estimator
    from anneal_geo.estimators.bcgue import BCGUEEstimator
    from anneal_geo.estimators.mgue import MGUEEstimator, balanced_threshold, pair_distances
    from anneal_geo.estimators.random import RandomEstimator


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anneal_geo.estimators' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
