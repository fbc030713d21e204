"""``smallcnn``: a compact CNN for small patches, trained end to end from the answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from anneal_geo.backbones.base import Backbone
from anneal_geo.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["SmallCNNBackbone"]


class SmallCNNBackbone(Backbone):
    """Four conv blocks (3x3 conv, batch norm, ReLU) of 32-64-128-256 channels, each
    halving the resolution, and global average pooling: ``out_dim`` 256, about 0.4 M
    parameters.

    Sized for 64 px patches on a CPU: a 64 px patch ends as a 4 x 4 map before pooling.
    Stride-2 convolutions do the downsampling: about 5x cheaper to train on a CPU than
    stride-1 convolutions followed by max-pooling, since no layer runs at full resolution.
    Inputs are standardised with the pool's per-band mean/std inside the module. Random
    initialisation (Kaiming), reproducible under ``seed``.

    Options:
        widths: channels of each block (default ``(32, 64, 128, 256)``).
        convs_per_block: convolutions per block (default 1; extra ones keep the resolution).
        downsample: ``"stride"`` (default) or ``"pool"`` (stride-1 convolution, then 2x2
            max-pooling).

    There are no pretrained weights (``weights`` must be None): a session resumes from its
    own checkpoint (:meth:`anneal_geo.training.Trainer.load_state_dict`).
    """

    trainable: ClassVar[bool] = True
    declared_options: ClassVar[Mapping[str, Any]] = {
        "widths": [32, 64, 128, 256],
        "convs_per_block": 1,
        "downsample": "stride",
    }

    def __init__(self, seed: int = 0, weights: str | None = None, **options: Any) -> None:
        super().__init__(seed=seed, weights=weights, **options)
        if weights is not None:
            raise ConfigError(
                "backbone 'smallcnn' has no pretrained weights; remove the weights setting "
                "(sessions resume from their own checkpoints) or use backbone 'resnet18'"
            )
        unknown = sorted(set(options) - {"widths", "convs_per_block", "downsample"})
        if unknown:
            raise ConfigError(
                f"backbone 'smallcnn' has no option {', '.join(unknown)}; "
                "known: widths, convs_per_block, downsample"
            )
        widths = tuple(int(w) for w in options.get("widths", (32, 64, 128, 256)))
        if not widths or min(widths) <= 0:
            raise ConfigError(f"backbone 'smallcnn': widths must be positive, got {widths}")
        self.widths = widths
        self.convs_per_block = int(options.get("convs_per_block", 1))
        if self.convs_per_block < 1:
            raise ConfigError("backbone 'smallcnn': convs_per_block must be at least 1")
        self.downsample = str(options.get("downsample", "stride"))
        if self.downsample not in ("stride", "pool"):
            raise ConfigError(
                f"backbone 'smallcnn': downsample must be 'stride' or 'pool', got "
                f"{self.downsample!r}"
            )

    def build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """The CNN for ``len(bands)`` input channels."""
        from anneal_geo._nets import SmallCNN, seeded

        with seeded(self.seed):
            net = SmallCNN(
                len(bands), mean, std, self.widths, self.convs_per_block, self.downsample
            )
        return net
