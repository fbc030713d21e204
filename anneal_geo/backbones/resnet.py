"""``resnet18``: a torchvision ResNet-18 whose first convolution takes the pool's bands."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from anneal_geo.backbones.base import Backbone
from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from anneal_geo.backbones.weights import BandMapping

__all__ = ["ResNet18Backbone"]

log = logging.getLogger(__name__)

_NORMALIZE = ("auto", "pool", "weights")


class ResNet18Backbone(Backbone):
    """ResNet-18 (torchvision layout) with a C-band first convolution; ``out_dim`` 512
    (globally average-pooled features, no classifier).

    Weights (``weights=``):
        - None: random initialisation, reproducible under ``seed``; the first convolution
          takes the pool's bands in the pool's order.
        - a local file: a state dict saved with ``torch.save`` (loaded with
          ``weights_only=True``); torchvision/timm parameter names, optionally wrapped in
          ``{"state_dict": ...}`` and prefixed ``backbone.``/``model.``/``encoder.``. The
          bands it expects come from a ``"bands"`` list in the file, a sidecar JSON
          (``<file>.json`` or ``<stem>.json`` with ``{"bands": [...]}``) or the
          ``weights_bands`` option; a file that records none is refused. Optional ``"mean"``
          and ``"std"`` lists in the file give its input normalisation.
        - a TorchGeo enum name, e.g. ``"ResNet18_Weights.SENTINEL2_ALL_MOCO"``: its bands
          and normalisation come from the enum's metadata; the file comes from the torch hub
          cache or is downloaded (offline: a DataError says to pass a local file instead).

    With weights, the pool's bands are matched to the weights' bands by name
    (:func:`anneal_geo.backbones.weights.match_bands`): if the pool has them all, the input
    channels are reordered (e.g. EuroSAT stores B8A last, SSL4EO-S12 expects it ninth) and
    unused pool bands are ignored; this is logged and recorded on the built module as
    ``band_mapping`` (and on the backbone as ``last_band_mapping``). Missing bands raise a
    DataError naming them.

    Options:
        weights_bands: the bands a local weights file expects, in order, or ``"pool"`` to
            declare that it expects the pool's own order.
        normalize: ``"auto"`` (default: the weights' normalisation when they record one,
            else the pool's per-band mean/std), ``"pool"`` or ``"weights"``.
        allow_download: download TorchGeo weights missing from the torch hub cache
            (default True).
    """

    trainable: ClassVar[bool] = True
    declared_options: ClassVar[Mapping[str, Any]] = {
        "weights_bands": None,
        "normalize": "auto",
        "allow_download": True,
    }

    def __init__(self, seed: int = 0, weights: str | None = None, **options: Any) -> None:
        super().__init__(seed=seed, weights=weights, **options)
        unknown = sorted(set(options) - {"weights_bands", "normalize", "allow_download"})
        if unknown:
            raise ConfigError(
                f"backbone 'resnet18' has no option {', '.join(unknown)}; "
                "known: weights_bands, normalize, allow_download"
            )
        self.weights_bands: str | list[str] | None = options.get("weights_bands")
        if isinstance(self.weights_bands, list | tuple):
            self.weights_bands = [str(b) for b in self.weights_bands]
        elif self.weights_bands not in (None, "pool"):
            raise ConfigError(
                "backbone 'resnet18': weights_bands must be a list of band names or 'pool'"
            )
        if self.weights_bands is not None and weights is None:
            raise ConfigError("backbone 'resnet18': weights_bands needs a weights file")
        self.normalize = str(options.get("normalize", "auto"))
        if self.normalize not in _NORMALIZE:
            raise ConfigError(
                f"backbone 'resnet18': normalize must be one of {', '.join(_NORMALIZE)}, "
                f"got {self.normalize!r}"
            )
        self.allow_download = bool(options.get("allow_download", True))
        self.last_band_mapping: BandMapping | None = None

    def build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """The trunk for these bands, with the weights loaded and the channels matched."""
        from anneal_geo._nets import ResNetTrunk, seeded
        from anneal_geo.backbones import weights as w

        bands = [w.canonical_band(b) for b in bands]
        mapping: BandMapping | None = None
        state: dict[str, Any] | None = None
        weights_norm: tuple[list[float], list[float]] | None = None
        label = "random initialisation"
        if self.weights is not None and not w.is_weights_file(self.weights):
            if self.weights_bands is not None:
                raise ConfigError(
                    "backbone 'resnet18': weights_bands applies to weight files; TorchGeo "
                    f"weights {self.weights} record their own bands"
                )
            member = w.resolve_enum(self.weights)
            label = f"weights {type(member).__name__}.{member.name}"
            # Check the bands before any download, so a bad pool fails at once.
            mapping = w.match_bands(bands, w.enum_bands(member), weights_label=label)
            state = w.load_enum_state_dict(member, allow_download=self.allow_download)
            weights_norm = w.enum_normalization(member)
        elif self.weights is not None:
            label = f"weights file {self.weights}"
            raw = w.load_file_state_dict(self.weights)
            state = w.checkpoint_state_dict(raw, source=label)
            if self.weights_bands == "pool":
                expected = list(bands)
            elif self.weights_bands is not None:
                expected = list(self.weights_bands)
            else:
                found = w.checkpoint_bands(raw, self.weights)
                if found is None:
                    raise DataError(
                        f"{label} does not record which bands it expects; add a 'bands' list "
                        'to the checkpoint dict or a sidecar <file>.json {"bands": [...]}, '
                        "or pass the option weights_bands=[...] (or 'pool')"
                    )
                expected = found
            mapping = w.match_bands(bands, expected, weights_label=label)
            weights_norm = _file_normalization(raw, len(expected), label)

        in_bands = list(mapping.weights_bands) if mapping is not None else bands
        channels = list(mapping.indices) if mapping is not None and not mapping.identity else None
        norm = self._normalization(mean, std, mapping, weights_norm, label)
        with seeded(self.seed):
            resnet = _torchvision_resnet18(len(in_bands))
        if state is not None:
            _load_resnet_state(resnet, state, len(in_bands), label)
        trunk = ResNetTrunk(resnet, channels, norm[0], norm[1], out_dim=512)
        trunk.band_mapping = mapping
        trunk.bands = in_bands
        self.last_band_mapping = mapping
        if mapping is not None:
            log.info("resnet18 with %s: %s", label, mapping.describe())
        return trunk

    def _normalization(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        mapping: BandMapping | None,
        weights_norm: tuple[list[float], list[float]] | None,
        label: str,
    ) -> tuple[list[float], list[float]]:
        """The (mean, std) per model input channel (after any reordering)."""
        if self.normalize == "weights" and weights_norm is None:
            raise ConfigError(
                f"backbone 'resnet18': normalize='weights' but {label} record no "
                "normalisation; use normalize='pool'"
            )
        if self.normalize != "pool" and weights_norm is not None:
            return weights_norm
        if mapping is None:
            return [float(m) for m in mean], [float(s) for s in std]
        return (
            [float(mean[i]) for i in mapping.indices],
            [float(std[i]) for i in mapping.indices],
        )


def _torchvision_resnet18(in_channels: int) -> torch.nn.Module:
    """A randomly initialised torchvision ResNet-18 taking ``in_channels`` bands, no classifier."""
    import torchvision
    from torch import nn

    net = torchvision.models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


def _load_resnet_state(
    net: torch.nn.Module, state: Mapping[str, Any], in_channels: int, label: str
) -> None:
    """Load ResNet parameters, naming the file and the mismatch on failure."""
    conv1 = state.get("conv1.weight")
    if conv1 is not None and int(conv1.shape[1]) != in_channels:
        raise DataError(
            f"{label}: its first convolution takes {int(conv1.shape[1])} bands but "
            f"{in_channels} band names were given for it; fix the weights' band list"
        )
    try:
        missing, unexpected = net.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
        raise DataError(f"{label} does not fit a ResNet-18 ({detail or exc})") from exc
    if missing or unexpected:
        names = ", ".join([*missing, *unexpected][:4])
        raise DataError(
            f"{label} is not a ResNet-18 state dict ({len(missing)} missing, "
            f"{len(unexpected)} unexpected parameters, e.g. {names})"
        )


def _file_normalization(
    raw: Mapping[str, Any], n_channels: int, label: str
) -> tuple[list[float], list[float]] | None:
    """Optional ``"mean"``/``"std"`` lists stored in a weights file."""
    if "mean" not in raw and "std" not in raw:
        return None
    try:
        mean = [float(v) for v in raw["mean"]]
        std = [float(v) for v in raw["std"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{label}: 'mean' and 'std' must both be lists of numbers") from exc
    if len(mean) != n_channels or len(std) != n_channels:
        raise DataError(
            f"{label}: 'mean'/'std' have {len(mean)}/{len(std)} values for {n_channels} bands"
        )
    return mean, std
