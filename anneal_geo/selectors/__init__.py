"""Diversity selectors: which k of the short-listed pairs to ask about.

The classes are imported on first access, so ``import anneal_geo.selectors`` stays
light; the engine reaches them through the plugin registry (``anneal_geo.plugins``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["KMeansSelector", "RandomSelector", "Selector", "TopKSelector", "pair_descriptors"]

_EXPORTS: dict[str, str] = {
    "KMeansSelector": "anneal_geo.selectors.kmeans",
    "RandomSelector": "anneal_geo.selectors.random",
    "Selector": "anneal_geo.selectors.base",
    "TopKSelector": "anneal_geo.selectors.topk",
    "pair_descriptors": "anneal_geo.selectors.descriptors",
}

if TYPE_CHECKING:
    from anneal_geo.selectors.base import Selector
    from anneal_geo.selectors.descriptors import pair_descriptors
    from anneal_geo.selectors.kmeans import KMeansSelector
    from anneal_geo.selectors.random import RandomSelector
    from anneal_geo.selectors.topk import TopKSelector


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anneal_geo.selectors' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
