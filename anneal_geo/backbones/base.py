"""The backbone contract: a network (trunk) that turns patches into feature vectors."""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from anneal_geo._options import check_options
from anneal_geo._validate import plugin_label
from anneal_geo.errors import AnnealError, PluginError

if TYPE_CHECKING:
    import torch

__all__ = ["CONTRACT_VERSION", "Backbone"]


#: Version of this contract; a plugin declaring another version is refused at load time.
CONTRACT_VERSION = 1


class Backbone(ABC):
    """Builds the trunk of the metric model for a pool's bands.

    The module returned by :meth:`build` takes raw patches, a float32 tensor
    (B, C, H, W) in the pool's own units (reflectance x 10000 for Sentinel-2, 0..255 for
    8-bit images) with C ordered as ``bands``, and returns (B, out_dim) features. It
    normalises with ``mean``/``std`` itself, so training-free features such as NDVI can
    see physical values. It must carry an integer attribute ``out_dim``. The engine adds
    the projection head and L2 normalisation on top.

    :meth:`checked_build` wraps the built module's ``forward`` (feature caching, training
    and embedding all go through it): an exception it raises becomes a one-line
    :class:`~anneal_geo.errors.PluginError` naming the plugin, and so do features of the
    wrong shape or with NaN; patches with NaN reaching it are a DataError.

    Capabilities (class attributes):
        trainable: the trunk has parameters worth fine-tuning end to end.

    Args:
        seed: seed of the trunk's random initialisation.
        weights: optional pretrained weights (an enum name or a local file path);
            interpreted by the backbone.
        **options: the backbone's own options: the keyword parameters of the subclass's
            ``__init__`` and its ``declared_options``; any other name is refused with a
            ConfigError listing the accepted ones (see :mod:`anneal_geo._options`).
    """

    trainable: ClassVar[bool] = True
    contract_version: ClassVar[int] = CONTRACT_VERSION
    plugin_name: ClassVar[str] = ""
    plugin_origin: ClassVar[str] = ""
    #: Options read from ``**options`` rather than named in ``__init__`` (name -> default).
    declared_options: ClassVar[Mapping[str, Any]] = {}
    _contract_base: ClassVar[bool] = True

    def __init__(self, seed: int = 0, weights: str | None = None, **options: Any) -> None:
        cls = type(self)
        check_options(cls, options, "backbone", cls.__dict__.get("plugin_name", ""))
        self.seed = int(seed)
        self.weights = weights
        self.options = options

    @abstractmethod
    def build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """Return the trunk for these bands.

        Args:
            bands: band names in the order of the input channels, e.g. ``["B04", "B03"]``.
            mean: per-band mean of the pool, same order.
            std: per-band standard deviation of the pool, same order.

        Returns:
            a ``torch.nn.Module`` with an ``out_dim`` attribute.
        """

    def checked_build(
        self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> torch.nn.Module:
        """:meth:`build`, then check the module: a Module with a positive ``out_dim``
        that maps a small batch to finite (B, out_dim) features."""
        import torch

        if not (len(bands) == len(mean) == len(std)):
            raise ValueError("bands, mean and std must have the same length")
        try:
            module = self.build(list(bands), list(mean), list(std))
        except AnnealError:
            raise  # already names the band or file at fault
        except Exception as exc:
            raise PluginError(
                f"{plugin_label(self)}: build() raised {type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc
        if not isinstance(module, torch.nn.Module):
            raise PluginError(
                f"{plugin_label(self)}: build() returned {type(module).__name__}, "
                "not a torch.nn.Module"
            )
        out_dim = getattr(module, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim <= 0:
            raise PluginError(
                f"{plugin_label(self)}: the built module needs a positive integer out_dim, "
                f"got {out_dim!r}"
            )
        # The class's forward, called through a checking method bound to this module; an
        # instance attribute, so the state dict and the module's class stay as they are.
        object.__setattr__(module, "_anneal_backbone", self)  # a plain attribute, not a child
        object.__setattr__(module, "forward", types.MethodType(_checked_forward, module))
        return module

    def check_features(self, features: torch.Tensor, batch: int, out_dim: int) -> torch.Tensor:
        """Validate a forward pass's output: shape (batch, out_dim), finite."""
        import torch

        if not isinstance(features, torch.Tensor) or tuple(features.shape) != (batch, out_dim):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
            raise PluginError(
                f"{plugin_label(self)}: forward() returned {shape}, expected ({batch}, {out_dim})"
            )
        if not torch.isfinite(features).all():
            raise PluginError(f"{plugin_label(self)}: forward() returned NaN or infinite features")
        return features


def _checked_forward(module: torch.nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    """The module's own ``forward``, with the backbone contract checked around it."""
    import torch

    backbone: Backbone = module._anneal_backbone  # type: ignore[assignment]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        from anneal_geo.errors import DataError

        raise DataError(
            f"patches with NaN or infinite values reached {plugin_label(backbone)}; the pool "
            "holds them: rebuild it with `anneal-geo pool build --nan-as-nodata`"
        )
    try:
        out = type(module).forward(module, x, *args, **kwargs)
    except AnnealError:
        raise
    except Exception as exc:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise PluginError(
            f"{plugin_label(backbone)}: forward() raised {type(exc).__name__} on input "
            f"{shape}: {exc}".splitlines()[0]
        ) from exc
    batch = int(x.shape[0]) if isinstance(x, torch.Tensor) else -1
    return backbone.check_features(out, batch, int(module.out_dim))  # type: ignore[arg-type]
