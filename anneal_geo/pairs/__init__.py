"""Pairs: the answer store, transitivity and candidate generation.

Nothing heavy is imported here; faiss is imported by :func:`knn_candidates` when called.
"""

from __future__ import annotations

from anneal_geo.pairs.candidates import (
    EXHAUSTIVE_MAX_PATCHES,
    candidate_blocks,
    count_exhaustive,
    default_mode,
    exhaustive_blocks,
    knn_candidates,
    pair_keys,
)
from anneal_geo.pairs.store import PairStore
from anneal_geo.pairs.transitivity import Closure, closure

__all__ = [
    "EXHAUSTIVE_MAX_PATCHES",
    "Closure",
    "PairStore",
    "candidate_blocks",
    "closure",
    "count_exhaustive",
    "default_mode",
    "exhaustive_blocks",
    "knn_candidates",
    "pair_keys",
]
