"""The metric model: a trunk, a projection head and L2 normalisation.

This module imports torch at its top, so :mod:`anneal_geo.training` imports it only when
:class:`MetricModel` is first used. The trunks (the backbones' networks) live in
:mod:`anneal_geo._nets`.

The attribute names inside :class:`MetricModel` (``trunk``, ``head``) and the layer order of
:class:`ProjectionHead` make the keys of a saved state dict (``trunk.*``, ``head.0.*``,
``head.2.*``): checkpoints load only while they stay the same. The mixing weight of the
retrieval embedding is the one further key, ``head.mix`` (a 0-d buffer of the head); a state
dict saved before it existed loads as ``mix = 0``, which embeds exactly as such a model did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anneal_geo._nets import seeded

__all__ = ["MetricModel", "ProjectionHead"]


def _default_mix(
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """A state dict from before the mixing weight existed embeds with ``mix = 0``."""
    state_dict.setdefault(prefix + "mix", torch.zeros(()))


class ProjectionHead(nn.Sequential):
    """Linear, ReLU, Linear: trunk features (B, in_dim) -> (B, out_dim), not normalised.

    It also keeps the weight with which :class:`MetricModel` mixes the frozen features into
    the embedding (the buffer ``mix``; it takes no part in the head's own output).

    Args:
        in_dim: the trunk's feature dimension.
        hidden: width of the hidden layer.
        out_dim: output dimension of the head.
        mix: the mixing weight, 0 or more.
    """

    mix: torch.Tensor

    def __init__(self, in_dim: int, hidden: int, out_dim: int, mix: float = 0.0) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )
        self.register_buffer("mix", torch.tensor(float(mix), dtype=torch.float32))
        self._register_load_state_dict_pre_hook(_default_mix)


class MetricModel(nn.Module):
    """A trunk, a projection head and L2 normalisation: patches -> unit embeddings.

    With ``mix = 0`` the embedding is the L2-normalised head output (``out_dim`` values).
    With ``mix > 0`` it keeps the frozen trunk features: the normalised head output
    concatenated with ``mix`` times the L2-normalised trunk features, normalised again
    (``out_dim + trunk_dim`` values). Squared distances are then a blend of the learned and
    the frozen ones, ``(|h_i - h_j|^2 + mix^2 |f_i - f_j|^2) / (1 + mix^2)``: the head learns
    what the features miss while the training-free neighbourhoods stay, which matters most
    when few answers are in.

    Args:
        trunk: a module with an integer ``out_dim`` mapping (B, C, H, W) to (B, out_dim).
        out_dim: output dimension of the head.
        hidden: width of the head's hidden layer.
        seed: seed of the head's initialisation.
        mix: weight of the normalised trunk features in the embedding, 0 or more (kept in
            the state dict as the head's buffer ``head.mix``).
    """

    def __init__(
        self,
        trunk: nn.Module,
        out_dim: int = 128,
        hidden: int = 256,
        seed: int = 0,
        mix: float = 0.0,
    ) -> None:
        super().__init__()
        in_dim = getattr(trunk, "out_dim", None)
        if not isinstance(in_dim, int) or in_dim <= 0:
            raise ValueError(f"the trunk needs a positive integer out_dim, got {in_dim!r}")
        if isinstance(mix, bool) or not (math.isfinite(float(mix)) and float(mix) >= 0.0):
            raise ValueError(f"mix must be a finite number >= 0, got {mix!r}")
        self.trunk = trunk
        #: The trunk's feature dimension (the head's input).
        self.trunk_dim = int(in_dim)
        #: The head's output dimension.
        self.out_dim = int(out_dim)
        with seeded(seed):
            self.head = ProjectionHead(in_dim, hidden, out_dim, mix=float(mix))

    @property
    def mix(self) -> torch.Tensor:
        """The mixing weight (0-d tensor, the head's buffer ``mix``)."""
        return self.head.mix

    @property
    def embedding_dim(self) -> int:
        """Dimension D of the embeddings: ``out_dim``, plus ``trunk_dim`` when ``mix > 0``."""
        return self.out_dim + (self.trunk_dim if float(self.mix) > 0.0 else 0)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head, mixing and L2 normalisation only, on trunk features (B, trunk.out_dim)."""
        out = F.normalize(self.head(features), dim=1)
        mix = float(self.mix)
        if mix == 0.0:
            return out
        frozen = F.normalize(features, dim=1) * mix
        return F.normalize(torch.cat([out, frozen], dim=1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.trunk(x))
