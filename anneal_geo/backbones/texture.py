"""``texture``: training-free colour, texture and spectral features, z-scored over the pool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from anneal_geo.backbones.base import Backbone
from anneal_geo.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch

__all__ = ["OPTIONS", "TextureBackbone", "fit_texture_trunk"]

#: The backbone's options: name -> (default, description).
OPTIONS: dict[str, tuple[Any, str]] = {
    "scales": (3, "dyadic scales of the gradient statistics, 1..4"),
    "histogram_bins": (4, "bins per true-colour band of the joint colour histogram, 2..8"),
    "lbp": (True, "include the local binary pattern histograms"),
    "fft": (False, "include the FFT ring power of every band"),
}


def _int_option(options: dict[str, Any], name: str, low: int, high: int) -> int:
    value = options.get(name, OPTIONS[name][0])
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"backbone 'texture': option {name}={value!r} must be a whole number from "
            f"{low} to {high}"
        )
    return int(value)


def _bool_option(options: dict[str, Any], name: str) -> bool:
    value = options.get(name, OPTIONS[name][0])
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0"}:
        return value.strip().lower() in {"true", "1"}
    if not isinstance(value, bool) and value not in (0, 1):
        raise ConfigError(f"backbone 'texture': option {name}={value!r} must be true or false")
    return bool(value)


class TextureBackbone(Backbone):
    """Colour, multi-scale texture and spectral statistics of each patch; no weights, no
    training. Works for any band set (8-bit RGB, 13-band Sentinel-2, a single band).

    Features, all per patch (``feature_names`` of the built module lists them):

    - the ``spectral`` backbone's statistics: per band on pool-standardised values the mean,
      standard deviation, 10th/50th/90th percentiles minus the mean (from every second
      pixel of each row and column) and mean absolute neighbour difference; the mean and
      standard deviation of every normalised-difference index whose bands the pool has;
    - colour, where true-colour bands (B04, B03, B02) are present: the square root of a
      joint soft histogram (``histogram_bins`` per band, equiprobable bins of a standard
      normal on pool-standardised values, 4x4x4 by default) of the 2 x 2 pixel means;
    - per band: the log mean absolute neighbour difference at each of ``scales`` dyadic
      scales (2 x 2 averaging between scales);
    - on the luminance (the mean of the standardised true-colour bands, else of all bands),
      at each scale: log mean gradient magnitude, its coefficient of variation and the
      rotation-invariant orientation coherences (one dominant direction, two orthogonal
      ones);
    - with ``lbp``: square roots of rotation-invariant uniform local binary pattern
      histograms (8 neighbours, radius 1, 10 bins) of the luminance at full and half
      resolution, and of each true-colour band (of each band when there is none);
    - with ``fft``: each band's log share of its power in 6 FFT rings (off by default: it
      lowered validation mAP@20 on EuroSAT-RGB and EuroSAT-MS).

    The module z-scores the features with pool statistics it keeps as buffers
    (``feature_mean``, ``feature_std``, ``fitted``), fitted once on the whole pool with
    ``fit_statistics(raw)`` or :func:`anneal_geo.backbones._texture_net.fit_texture_trunk`
    (identity before fitting), then weights each feature family equally
    (``anneal_geo.backbones._texture_net.FAMILY_SHARE``): a saved state dict embeds new
    patches like the pool. Statistics are never taken over a batch, so a patch's features
    do not depend on its batch. ``seed`` is ignored; ``weights`` must be None.

    Options:
        scales: dyadic scales of the gradient statistics, 1..4 (default 3).
        histogram_bins: bins per true-colour band of the colour histogram, 2..8 (default 4).
        lbp: include the local binary pattern histograms (default true).
        fft: include the FFT ring power of every band (default false).
    """

    trainable: ClassVar[bool] = False
    declared_options: ClassVar[Mapping[str, Any]] = {k: v[0] for k, v in OPTIONS.items()}

    def __init__(self, seed: int = 0, weights: str | None = None, **options: Any) -> None:
        super().__init__(seed=seed, weights=weights, **options)
        if weights is not None:
            raise ConfigError("backbone 'texture' takes no weights; remove the weights setting")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"backbone 'texture' has no option {', '.join(unknown)}; "
                f"accepted: {', '.join(OPTIONS)}"
            )
        self.scales = _int_option(options, "scales", 1, 4)
        self.histogram_bins = _int_option(options, "histogram_bins", 2, 8)
        self.lbp = _bool_option(options, "lbp")
        self.fft = _bool_option(options, "fft")

    def build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """The feature extractor for these bands (a ``TextureTrunk``; ``out_dim`` depends on
        the bands and options, see its ``feature_names``)."""
        from anneal_geo.backbones._texture_net import TextureTrunk
        from anneal_geo.backbones.weights import canonical_band

        trunk = TextureTrunk(
            [canonical_band(b) for b in bands],
            mean,
            std,
            scales=self.scales,
            histogram_bins=self.histogram_bins,
            lbp=self.lbp,
            fft=self.fft,
        )
        return trunk.eval()


def fit_texture_trunk(
    trunk: torch.nn.Module,
    get_batch: Callable[[np.ndarray], np.ndarray],
    n: int,
    chunk: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Fit a built ``texture`` trunk's pool statistics on a whole pool and return its
    normalised (n, out_dim) float32 features (imports torch; see
    :func:`anneal_geo.backbones._texture_net.fit_texture_trunk`).

    Args:
        trunk: the module :meth:`TextureBackbone.build` returned.
        get_batch: ``get_batch(ids) -> (len(ids), C, H, W)`` patches in the pool's units,
            e.g. ``pool.float_patches``.
        n: the number of patches in the pool.
        chunk: patches per forward pass.
        progress: show a tqdm progress bar.
    """
    from anneal_geo.backbones import _texture_net

    if not isinstance(trunk, _texture_net.TextureTrunk):
        raise TypeError(f"fit_texture_trunk needs a texture trunk, got {type(trunk).__name__}")
    return _texture_net.fit_texture_trunk(trunk, get_batch, n, chunk=chunk, progress=progress)
