"""The losses of the trainer (METHOD.md 3.8), on L2-normalised embeddings, and the sampler that
forms the triplets of the triplet loss from answered pairs.

- contrastive: ``y d^2 + (1 - y) max(0, m - d)^2`` averaged over the pairs;
- balanced contrastive: the same with similar and dissimilar pairs weighted equally (the
  ``batch_all`` batches of the ``"full"`` mode);
- triplet: ``max(0, d(a, p) - d(a, n) + m)`` on (anchor, positive, negative) triplets.
- trimmed contrastive: the contrastive loss without the ``share`` of the similar and of the
  dissimilar pairs of a batch with the largest loss (small-loss selection: a wrong answer
  is the one the model disagrees with most, so it is left out rather than memorised).

``d`` is the Euclidean distance of two embeddings (in [0, 2] for unit vectors). Importing this
module does not import torch; the functions take and return torch tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Private helpers of the trainer; anneal_geo.training re-exports them for its tests.
__all__: list[str] = []


class _TripletSampler:
    """Draws (anchor, positive, negative) triplets from labelled pairs, vectorised.

    A similar pair (a, p), in either orientation, gets a negative drawn uniformly from the
    patches with a dissimilar answer against ``a``.
    """

    def __init__(self, pairs: np.ndarray, labels: np.ndarray) -> None:
        pos = pairs[labels == 1]
        neg = pairs[labels == 0]
        anchors = np.concatenate([pos[:, 0], pos[:, 1]])
        positives = np.concatenate([pos[:, 1], pos[:, 0]])
        src = np.concatenate([neg[:, 0], neg[:, 1]])
        dst = np.concatenate([neg[:, 1], neg[:, 0]])
        order = np.argsort(src, kind="stable")
        self.neg_src, self.neg_dst = src[order], dst[order]
        first = np.searchsorted(self.neg_src, anchors, side="left")
        count = np.searchsorted(self.neg_src, anchors, side="right") - first
        ok = count > 0
        self.anchors, self.positives = anchors[ok], positives[ok]
        self.first, self.count = first[ok], count[ok]
        self.possible = bool(ok.any())

    def sample(self, k: int, generator: torch.Generator) -> np.ndarray:
        import torch

        rows = torch.randint(len(self.anchors), (k,), generator=generator).numpy()
        offset = (torch.rand(k, generator=generator).numpy() * self.count[rows]).astype(np.int64)
        offset = np.minimum(offset, self.count[rows] - 1)
        negatives = self.neg_dst[self.first[rows] + offset]
        return np.stack([self.anchors[rows], self.positives[rows], negatives], axis=1)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The epsilon keeps the gradient finite for identical embeddings.
    return ((a - b).pow(2).sum(dim=1) + 1e-12).sqrt()


def _contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, margin: float
) -> torch.Tensor:
    d = _distance(a, b)
    return (y * d.pow(2) + (1 - y) * (margin - d).clamp(min=0).pow(2)).mean()


def _trimmed_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, margin: float, share: float
) -> torch.Tensor:
    """The contrastive loss over the batch without the ``share`` (rounded down) of its
    similar pairs and of its dissimilar pairs whose loss is largest."""
    import torch

    d = _distance(a, b)
    per_pair = y * d.pow(2) + (1 - y) * (margin - d).clamp(min=0).pow(2)
    keep = torch.ones_like(per_pair, dtype=torch.bool)
    for group in (y > 0.5, y <= 0.5):
        rows = torch.nonzero(group).reshape(-1)
        k = int(share * rows.numel())
        if k:
            worst = torch.topk(per_pair.detach()[rows], k).indices
            keep[rows[worst]] = False
    return per_pair[keep].mean()


def _balanced_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, margin: float
) -> torch.Tensor:
    """The contrastive loss with similar and dissimilar pairs weighted equally."""
    import torch

    d = _distance(a, b)
    pos = y > 0.5
    terms = []
    if bool(pos.any()):
        terms.append(d[pos].pow(2).mean())
    if bool((~pos).any()):
        terms.append((margin - d[~pos]).clamp(min=0).pow(2).mean())
    return torch.stack(terms).mean()


def _triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    return (_distance(anchor, positive) - _distance(anchor, negative) + margin).clamp(min=0).mean()
