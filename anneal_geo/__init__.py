"""anneal-geo: annotation cost-efficient active learning (ANNEAL) for Sentinel-2 image retrieval.

The public API is re-exported here lazily: ``import anneal_geo`` imports neither torch,
torchgeo, faiss nor rasterio; each is imported when the object that needs it is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AnnealError": "anneal_geo.errors",
    "Annotator": "anneal_geo.annotators.base",
    "Backbone": "anneal_geo.backbones.base",
    "ConfigError": "anneal_geo.errors",
    "DataError": "anneal_geo.errors",
    "Estimator": "anneal_geo.estimators.base",
    "PairStore": "anneal_geo.pairs.store",
    "PatchPool": "anneal_geo.data.pool",
    "PluginError": "anneal_geo.errors",
    "Selector": "anneal_geo.selectors.base",
    "Session": "anneal_geo.session",
    "SessionConfig": "anneal_geo.session",
    "SessionError": "anneal_geo.errors",
    "load_model": "anneal_geo.models.model",
    "register": "anneal_geo.plugins",
}

__all__ = [
    "AnnealError",
    "Annotator",
    "Backbone",
    "ConfigError",
    "DataError",
    "Estimator",
    "PairStore",
    "PatchPool",
    "PluginError",
    "Selector",
    "Session",
    "SessionConfig",
    "SessionError",
    "__version__",
    "load_model",
    "register",
]

if TYPE_CHECKING:
    from anneal_geo.annotators.base import Annotator
    from anneal_geo.backbones.base import Backbone
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.errors import AnnealError, ConfigError, DataError, PluginError, SessionError
    from anneal_geo.estimators.base import Estimator
    from anneal_geo.models.model import load_model
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.plugins import register
    from anneal_geo.selectors.base import Selector
    from anneal_geo.session import Session, SessionConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anneal_geo' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
