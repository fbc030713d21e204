"""The metric model: a trunk, a projection head and L2 normalisation.

This module imports torch at its top, so :mod:`anneal_geo.training` imports it only when
:class:`MetricModel` is first used. The trunks (the backbones' networks) live in
:mod:`anneal_geo._nets`.

The attribute names inside :class:`MetricModel` (``trunk``, ``head``) and the layer order of
:class:`ProjectionHead` make the keys of a saved state dict (``trunk.*``, ``head.0.*``,
``head.2.*``): checkpoints load only while they stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anneal_geo._nets import seeded

__all__ = ["MetricModel", "ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """Linear, ReLU, Linear: trunk features (B, in_dim) -> (B, out_dim), not normalised.

    Args:
        in_dim: the trunk's feature dimension.
        hidden: width of the hidden layer.
        out_dim: embedding dimension D.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )


class MetricModel(nn.Module):
    """A trunk, a projection head and L2 normalisation: patches -> unit embeddings.

    Args:
        trunk: a module with an integer ``out_dim`` mapping (B, C, H, W) to (B, out_dim).
        out_dim: embedding dimension D.
        hidden: width of the head's hidden layer.
        seed: seed of the head's initialisation.
    """

    def __init__(
        self, trunk: nn.Module, out_dim: int = 128, hidden: int = 256, seed: int = 0
    ) -> None:
        super().__init__()
        in_dim = getattr(trunk, "out_dim", None)
        if not isinstance(in_dim, int) or in_dim <= 0:
            raise ValueError(f"the trunk needs a positive integer out_dim, got {in_dim!r}")
        self.trunk = trunk
        #: The trunk's feature dimension (the head's input).
        self.trunk_dim = int(in_dim)
        self.out_dim = int(out_dim)
        with seeded(seed):
            self.head = ProjectionHead(in_dim, hidden, out_dim)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head and L2 normalisation only, on trunk features (B, trunk.out_dim)."""
        return F.normalize(self.head(features), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.trunk(x))
