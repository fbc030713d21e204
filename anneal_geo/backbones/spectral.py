"""``spectral``: training-free features computed from band names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from anneal_geo.backbones.base import Backbone
from anneal_geo.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["SpectralBackbone"]


class SpectralBackbone(Backbone):
    """Per-band statistics, texture and spectral indices; no weights, no training.

    For each band, on the values standardised with the pool's mean/std: the patch mean,
    the standard deviation, the 10th/50th/90th percentiles minus the mean (the shape of
    the distribution), and the mean absolute difference of neighbouring pixels (texture).
    For each normalised-difference index whose bands the pool has (NDVI, NDWI, NDBI, NBR,
    NDRE, MNDWI from Sentinel-2 band names; GRVI from green and red, so 8-bit RGB gets it
    too), computed on the physical values: its patch mean and standard deviation. A band
    subset without any index band still works (band features only).

    Features are scaled per group by fixed constants (``anneal_geo._nets.SCALES``), never by
    batch statistics, so a patch's features do not depend on which batch it is in and each
    group spreads over roughly unit scale. The built module lists its features in
    ``feature_names``.

    The backbone takes no options and ignores ``seed``; ``weights`` must be None.
    """

    trainable: ClassVar[bool] = False

    def __init__(self, seed: int = 0, weights: str | None = None, **options: Any) -> None:
        super().__init__(seed=seed, weights=weights, **options)
        if weights is not None:
            raise ConfigError("backbone 'spectral' takes no weights; remove the weights setting")
        if options:
            raise ConfigError(
                f"backbone 'spectral' takes no options, got {', '.join(sorted(options))}"
            )

    def build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """The feature extractor for these bands (``out_dim`` = 6 per band + 2 per index)."""
        from anneal_geo._nets import SpectralTrunk
        from anneal_geo.backbones.weights import canonical_band

        trunk = SpectralTrunk([canonical_band(b) for b in bands], mean, std)
        return trunk.eval()
