"""Retrieval: exact faiss search, archive/query splits and ranking metrics (mAP@k, P@k, MAP@R).

Importing this package does not import faiss; the search functions import it when called.
"""

from anneal_geo.retrieval.evaluate import evaluate, relevance_matrix
from anneal_geo.retrieval.index import exact_search, expand_queries, rank_all
from anneal_geo.retrieval.metrics import (
    average_precision,
    count_unscorable,
    map_at_r,
    mean_average_precision,
    mean_over_queries,
    precision_at_k,
    r_precision,
)
from anneal_geo.retrieval.split import strata, stratified_split

__all__ = [
    "average_precision",
    "count_unscorable",
    "evaluate",
    "exact_search",
    "expand_queries",
    "map_at_r",
    "mean_average_precision",
    "mean_over_queries",
    "precision_at_k",
    "r_precision",
    "rank_all",
    "relevance_matrix",
    "strata",
    "stratified_split",
]
