"""Backbones: the trunk networks that turn patches into feature vectors.

Built-ins (registered as entry points, imported lazily): ``spectral``
(:class:`~anneal_geo.backbones.spectral.SpectralBackbone`), ``resnet18``
(:class:`~anneal_geo.backbones.resnet.ResNet18Backbone`) and ``smallcnn``
(:class:`~anneal_geo.backbones.smallcnn.SmallCNNBackbone`). Band matching for pretrained
weights lives in :mod:`anneal_geo.backbones.weights`.
"""

from anneal_geo.backbones.base import Backbone

__all__ = ["Backbone"]
