"""The selector contract: which k of the short-listed pairs to ask about (diversity)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from anneal_geo._options import check_options
from anneal_geo._validate import check_array, plugin_label
from anneal_geo.errors import PluginError

__all__ = ["CONTRACT_VERSION", "Selector"]


#: Version of this contract; a plugin declaring another version is refused at load time.
CONTRACT_VERSION = 1


class Selector(ABC):
    """Picks ``k`` distinct pairs from a short-list, given their descriptors and uncertainty.

    Subclasses implement :meth:`select`; the engine calls :meth:`checked_select`, which
    validates the result (length k, integer, in range, no repeats) and names the plugin
    in any error.

    Args:
        seed: seed used when no generator is passed.
        **options: the selector's own options: the keyword parameters of the subclass's
            ``__init__`` and its ``declared_options``; any other name is refused with a
            ConfigError listing the accepted ones (see :mod:`anneal_geo._options`).
    """

    contract_version: ClassVar[int] = CONTRACT_VERSION
    plugin_name: ClassVar[str] = ""
    plugin_origin: ClassVar[str] = ""
    #: Options read from ``**options`` rather than named in ``__init__`` (name -> default).
    declared_options: ClassVar[Mapping[str, Any]] = {}
    _contract_base: ClassVar[bool] = True

    def __init__(self, seed: int = 0, **options: Any) -> None:
        cls = type(self)
        check_options(cls, options, "selector", cls.__dict__.get("plugin_name", ""))
        self.seed = int(seed)
        self.options = options

    @abstractmethod
    def select(
        self,
        descriptors: np.ndarray,
        uncertainty: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Choose ``k`` rows.

        Args:
            descriptors: (M, F) float32 symmetric pair descriptors
                ``[f_i + f_j, |f_i - f_j|]``.
            uncertainty: (M,) float64, higher = more uncertain.
            k: how many to choose, ``1 <= k <= M``.
            rng: the only random source to use.

        Returns:
            (k,) integer indices into the M rows, distinct.
        """

    def checked_select(
        self,
        descriptors: np.ndarray,
        uncertainty: np.ndarray,
        k: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """:meth:`select` with validated inputs and output, as int64 of shape (k,)."""
        desc = np.ascontiguousarray(descriptors, dtype=np.float32)
        unc = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
        m = desc.shape[0]
        if desc.ndim != 2 or unc.shape[0] != m:
            raise ValueError(f"descriptors {desc.shape} and uncertainty {unc.shape} disagree")
        if not 0 <= k <= m:
            raise ValueError(f"cannot select {k} of {m} pairs")
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        generator = rng if rng is not None else np.random.default_rng(self.seed)
        try:
            out = self.select(desc, unc, int(k), generator)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{plugin_label(self)}: select() raised {type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc
        idx = check_array(self, "select() output", out, shape=(k,), kind="iu")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= m):
            raise PluginError(f"{plugin_label(self)}: select() returned indices outside [0, {m})")
        if np.unique(idx).size != idx.size:
            raise PluginError(f"{plugin_label(self)}: select() returned repeated indices")
        return idx
