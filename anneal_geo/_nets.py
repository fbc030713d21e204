"""The torch modules behind the backbones: the trunks and their standardisation.

Private and imported lazily (by the backbones' ``build()``), so that ``import anneal_geo`` and
the plugin listing never import torch. The metric model and its projection head live in
:mod:`anneal_geo.training.heads`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "INDICES",
    "ResNetTrunk",
    "SmallCNN",
    "SpectralTrunk",
    "Standardize",
    "seeded",
]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU generator seeded with ``seed``, restoring it
    afterwards: layer initialisation becomes reproducible without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel, the statistics stored as buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        # A constant band (std 0) must not produce infinities.
        std_t = torch.where(std_t > 0, std_t, torch.ones_like(std_t))
        self.register_buffer(
            "mean", torch.as_tensor(list(mean), dtype=torch.float32)[:, None, None]
        )
        self.register_buffer("std", std_t[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- spectral

#: Normalised-difference indices (a - b) / (a + b): name -> (band a options, band b options).
#: The first band of each option tuple that the pool has is used.
INDICES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "NDVI": (("B08", "B8A"), ("B04",)),  # vegetation
    "NDWI": (("B03",), ("B08", "B8A")),  # open water (McFeeters, green/NIR)
    "NDBI": (("B11",), ("B08", "B8A")),  # built-up (= -NDMI, moisture)
    "NBR": (("B08", "B8A"), ("B12",)),  # burn ratio
    "NDRE": (("B8A", "B08"), ("B05",)),  # red edge / chlorophyll
    "MNDWI": (("B03",), ("B11",)),  # modified water index (green/SWIR)
    "GRVI": (("B03",), ("B04",)),  # green-red vegetation index, needs no NIR (works on RGB)
}

#: Fixed scale of each feature group, so every group spreads over roughly unit scale across
#: typical Sentinel-2 patches whatever the batch (measured on EuroSAT: the cross-patch
#: standard deviation of a band's within-patch std is ~0.3 in standardised units, of its
#: mean absolute gradient ~0.15-0.25, of an index's patch mean ~0.25 and of its within-patch
#: std ~0.05). Weighting the groups this way raised retrieval mAP@20 on EuroSAT from ~0.32
#: (plain statistics) to ~0.46.
SCALES: dict[str, float] = {
    "mean": 1.0,
    "std": 3.0,
    "quantile": 1.0,
    "grad": 6.0,
    "index_mean": 4.0,
    "index_std": 20.0,
}
QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)


def _quantiles(values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles along the last axis (linear interpolation, like numpy's default).

    ``torch.quantile`` refuses inputs over 16M elements, which a large batch reaches.
    """
    ordered = values.sort(dim=-1).values
    n = ordered.shape[-1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(ordered[..., lo] * (1 - frac) + ordered[..., hi] * frac)
    return torch.stack(out, dim=-1)


def index_pairs(bands: Sequence[str]) -> list[tuple[str, int, int]]:
    """The spectral indices ``bands`` can compute: (name, position of a, position of b) for
    each of ``INDICES`` whose two bands (any of their alternatives) are present and differ."""
    position = {b: i for i, b in enumerate(bands)}
    pairs: list[tuple[str, int, int]] = []
    for name, (a_opts, b_opts) in INDICES.items():
        a = next((position[b] for b in a_opts if b in position), None)
        b = next((position[b] for b in b_opts if b in position), None)
        if a is not None and b is not None and a != b:
            pairs.append((name, a, b))
    return pairs


class SpectralTrunk(nn.Module):
    """Training-free features from band names (see ``anneal_geo.backbones.spectral``)."""

    index_a: torch.Tensor
    index_b: torch.Tensor

    def __init__(self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.bands = [str(b) for b in bands]
        self.standardize = Standardize(mean, std)
        pairs = index_pairs(self.bands)
        self.index_names = [name for name, _, _ in pairs]
        self.register_buffer("index_a", torch.tensor([a for _, a, _ in pairs], dtype=torch.long))
        self.register_buffer("index_b", torch.tensor([b for _, _, b in pairs], dtype=torch.long))
        names: list[str] = []
        names += [f"{b}:mean" for b in self.bands]
        names += [f"{b}:std" for b in self.bands]
        names += [f"{b}:p{round(q * 100)}-mean" for b in self.bands for q in QUANTILES]
        names += [f"{b}:grad" for b in self.bands]
        names += [f"{n}:mean" for n in self.index_names]
        names += [f"{n}:std" for n in self.index_names]
        self.feature_names = names
        self.out_dim = len(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        batch = x.shape[0]
        z = self.standardize(x)
        flat = z.flatten(2)
        mean = flat.mean(-1)
        std = flat.std(-1, unbiased=False)
        quant = (_quantiles(flat, QUANTILES) - mean[..., None]).flatten(1)
        # Mean absolute difference of neighbouring pixels: a cheap texture measure that
        # separates e.g. highways and residential areas from fields of the same colour.
        grad = (z[..., 1:, :] - z[..., :-1, :]).abs().mean((-2, -1)) + (
            z[..., :, 1:] - z[..., :, :-1]
        ).abs().mean((-2, -1))
        parts = [
            mean * SCALES["mean"],
            std * SCALES["std"],
            quant * SCALES["quantile"],
            grad * SCALES["grad"],
        ]
        if len(self.index_names):
            # Indices are ratios of physical values (reflectance or digital numbers), so they
            # use the raw input; negative values (nodata, offsets) are clipped to 0.
            phys = x.clamp(min=0)
            a = phys[:, self.index_a]
            b = phys[:, self.index_b]
            ratio = (a - b) / (a + b).clamp(min=1e-6)
            ratio = ratio.flatten(2)
            parts.append(ratio.mean(-1) * SCALES["index_mean"])
            parts.append(ratio.std(-1, unbiased=False) * SCALES["index_std"])
        features = torch.cat(parts, dim=1)
        return features.reshape(batch, self.out_dim)


# ----------------------------------------------------------------------------- CNNs


class SmallCNN(nn.Module):
    """Conv blocks of (3x3 conv, batch norm, ReLU), each halving the resolution, then global
    average pooling.

    ``downsample="stride"`` halves with a stride-2 convolution, ``"pool"`` with a stride-1
    convolution and 2x2 max-pooling (4x the compute: the first block runs at full resolution).
    """

    def __init__(
        self,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int] = (32, 64, 128, 256),
        convs_per_block: int = 1,
        downsample: str = "stride",
    ) -> None:
        super().__init__()
        self.standardize = Standardize(mean, std)
        layers: list[nn.Module] = []
        c_in = in_channels
        for width in widths:
            for i in range(convs_per_block):
                stride = 2 if downsample == "stride" and i == 0 else 1
                layers += [
                    nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                c_in = width
            if downsample == "pool":
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.out_dim = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.standardize(x.float()))
        return h.mean((-2, -1))


class ResNetTrunk(nn.Module):
    """Channel selection/reordering, standardisation, then a ResNet without its classifier."""

    channels: torch.Tensor

    def __init__(
        self,
        resnet: nn.Module,
        channels: Sequence[int] | None,
        mean: Sequence[float],
        std: Sequence[float],
        out_dim: int = 512,
    ) -> None:
        super().__init__()
        self.reorder = channels is not None
        self.register_buffer(
            "channels",
            torch.tensor(list(channels) if channels is not None else [], dtype=torch.long),
        )
        self.standardize = Standardize(mean, std)
        self.resnet = resnet
        self.out_dim = int(out_dim)
        #: How the pool's bands feed the weights (a BandMapping), None without weights.
        self.band_mapping: object | None = None
        #: The bands of the model's input channels, in order.
        self.bands: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.reorder:
            x = x.index_select(1, self.channels)
        return self.resnet(self.standardize(x)).flatten(1)
