"""The metric-learning trainer: a trunk, a projection head, contrastive loss on answered pairs.

Two modes:

- ``"head"``: the trunk's features of the whole pool are computed once
  (:meth:`Trainer.cache_features`; a trunk that fits pool statistics, such as ``texture``'s,
  is fitted on the pool then, once) and each round trains only the projection head on them;
  re-embedding the pool is a pass of the small head (milliseconds). The fast first stage.
- ``"full"``: trunk and head train end to end on the raw patches of the answered pairs
  (Adam, ``lr_trunk`` for the trunk, ``lr_head`` for the head), with random flips and
  90-degree rotations; re-embedding runs the whole network.

Loss (METHOD.md 3.8): contrastive ``y d^2 + (1 - y) max(0, m - d)^2`` on L2-normalised
embeddings, margin ``m = 0.5``, or a triplet loss on triplets formed from the pairs. Every
batch holds as many similar as dissimilar pairs (drawn with replacement, so the rarer answer
is repeated). A round trains on at most ``pair_budget`` labelled pairs: every queried pair and
a fresh class-balanced sample of the implied ones, so its cost does not grow with the implied
pairs. The embedding is the head's output, optionally concatenated with ``mix`` times the
L2-normalised trunk features (:class:`MetricModel`). The trainer keeps the model and the
optimizer state between rounds (warm start) and draws every random number from its own seeded
``torch.Generator``.

A *patch source* is either an array (N, C, H, W) in the pool's units (a ``np.memmap`` works),
or a function ``get_batch(ids) -> (len(ids), C, H, W) float32`` together with ``n``, e.g.
``pool.float_patches`` and ``len(pool)``.

The package:

- :mod:`anneal_geo.training.trainer`: :class:`Trainer`, :class:`RoundStats`, ``PatchSource``
  and the batching helpers (balanced pair batches, labelled pairs among a batch, flips and
  rotations);
- :mod:`anneal_geo.training.losses`: the contrastive, balanced contrastive and triplet losses
  and the triplet sampler;
- :mod:`anneal_geo.training.heads`: :class:`MetricModel` and its projection head. It imports
  torch at its top, so ``MetricModel`` is imported from there on first use: importing this
  package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anneal_geo.training.losses import _contrastive_loss as _contrastive_loss
from anneal_geo.training.losses import _TripletSampler as _TripletSampler
from anneal_geo.training.trainer import PatchSource, RoundStats, SharedFeatures, Trainer
from anneal_geo.training.trainer import _balanced_rows as _balanced_rows
from anneal_geo.training.trainer import _dihedral as _dihedral
from anneal_geo.training.trainer import _PairLookup as _PairLookup

if TYPE_CHECKING:
    from anneal_geo.training.heads import MetricModel

__all__ = ["MetricModel", "PatchSource", "RoundStats", "SharedFeatures", "Trainer"]


def __getattr__(name: str) -> Any:
    # MetricModel subclasses torch.nn.Module; it is imported on first use so that importing
    # this package does not import torch.
    if name == "MetricModel":
        from anneal_geo.training.heads import MetricModel

        return MetricModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
