"""Symmetric pair descriptors, the space in which the k-means selector measures diversity."""

from __future__ import annotations

import numpy as np

from anneal_geo.errors import DataError

__all__ = ["pair_descriptors"]

#: Pairs gathered at a time, so the temporaries stay a few tens of MB for any M.
_BLOCK = 65_536


def pair_descriptors(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Describe each pair by ``[f_i + f_j, |f_i - f_j|]``.

    Both halves are symmetric in the pair order, so (i, j) and (j, i) get the same
    descriptor: the sum says *where* in the embedding space the pair sits, the absolute
    difference says *how* the two patches differ.

    Args:
        embeddings: (N, D) embeddings of the pool.
        pairs: (M, 2) integer patch ids.

    Returns:
        (M, 2D) float32, C-contiguous (what faiss expects).

    Raises:
        DataError: the arrays have the wrong shape or a pair id is out of range.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    prs = np.asarray(pairs)
    if emb.ndim != 2:
        raise DataError(f"pair_descriptors: embeddings must be (N, D), got shape {emb.shape}")
    if prs.ndim != 2 or prs.shape[1] != 2 or (prs.size and prs.dtype.kind not in "iu"):
        raise DataError(
            f"pair_descriptors: pairs must be an (M, 2) integer array, got {prs.dtype} {prs.shape}"
        )
    n, dim = emb.shape
    if prs.size and (prs.min() < 0 or prs.max() >= n):
        raise DataError(f"pair_descriptors: pair ids must lie in [0, {n}) for {n} embeddings")
    out = np.empty((prs.shape[0], 2 * dim), dtype=np.float32)
    for start in range(0, prs.shape[0], _BLOCK):
        block = prs[start : start + _BLOCK]
        a = emb[block[:, 0]]
        b = emb[block[:, 1]]
        np.add(a, b, out=out[start : start + len(block), :dim])
        np.abs(a - b, out=out[start : start + len(block), dim:])
    return out
