"""The estimator contract: how uncertain is each candidate pair?"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from anneal_geo._options import check_options
from anneal_geo._validate import check_array, plugin_label
from anneal_geo.errors import PluginError

__all__ = ["CONTRACT_VERSION", "Estimator"]


#: Version of this contract; a plugin declaring another version is refused at load time.
CONTRACT_VERSION = 1


class Estimator(ABC):
    """Scores candidate pairs by uncertainty: higher means more uncertain.

    Subclasses implement :meth:`score` and may override :meth:`fit`. The engine calls
    :meth:`checked_fit` and :meth:`checked_score`, which validate inputs and outputs and
    name the plugin in any error.

    Args:
        seed: seed of every random source the estimator uses.
        **options: the estimator's own options: the keyword parameters of the subclass's
            ``__init__`` and its ``declared_options``; any other name is refused with a
            ConfigError listing the accepted ones (see :mod:`anneal_geo._options`).

    Capabilities (class attributes, read by the engine instead of type checks):
        needs_labels: ``fit`` must see at least one similar and one dissimilar pair.
        symmetric: ``score`` gives the same value for (i, j) and (j, i).
        uses_embeddings: the scores depend on the embedding. When False (the random
            baseline), ``auto`` candidates are a uniform sample of all pairs, so the
            baseline draws truly random pairs on any pool size, not random neighbours.
    """

    needs_labels: ClassVar[bool] = False
    uses_embeddings: ClassVar[bool] = True
    symmetric: ClassVar[bool] = True
    contract_version: ClassVar[int] = CONTRACT_VERSION
    plugin_name: ClassVar[str] = ""
    plugin_origin: ClassVar[str] = ""
    #: Options read from ``**options`` rather than named in ``__init__`` (name -> default).
    declared_options: ClassVar[Mapping[str, Any]] = {}
    _contract_base: ClassVar[bool] = True

    def __init__(self, seed: int = 0, **options: Any) -> None:
        cls = type(self)
        check_options(cls, options, "estimator", cls.__dict__.get("plugin_name", ""))
        self.seed = int(seed)
        self.options = options

    def fit(self, embeddings: np.ndarray, pairs: np.ndarray, labels: np.ndarray) -> None:  # noqa: B027
        """Learn from the labelled pairs. Default: nothing to learn.

        Args:
            embeddings: (N, D) float32, L2-normalised embeddings of the pool.
            pairs: (M, 2) int64 patch ids of labelled pairs (queried and implied).
            labels: (M,) int8, 1 = similar, 0 = dissimilar.
        """

    @abstractmethod
    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Uncertainty of each pair.

        Args:
            embeddings: (N, D) float32, L2-normalised.
            pairs: (M, 2) int64 patch ids, ``pairs[:, 0] < pairs[:, 1]``.

        Returns:
            (M,) floating array, finite; higher = more uncertain.
        """

    # -- validated entry points used by the engine -----------------------------------

    @staticmethod
    def _check_inputs(embeddings: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        prs = np.ascontiguousarray(pairs, dtype=np.int64).reshape(-1, 2)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
        if prs.size and (prs.min() < 0 or prs.max() >= emb.shape[0]):
            raise ValueError(f"pair ids must lie in [0, {emb.shape[0]})")
        return emb, prs

    def checked_fit(self, embeddings: np.ndarray, pairs: np.ndarray, labels: np.ndarray) -> None:
        """:meth:`fit` with validated inputs; a plugin's exception becomes a PluginError."""
        emb, prs = self._check_inputs(embeddings, pairs)
        lab = np.asarray(labels, dtype=np.int8).reshape(-1)
        if lab.shape[0] != prs.shape[0]:
            raise ValueError(f"{prs.shape[0]} labelled pairs but {lab.shape[0]} labels")
        try:
            self.fit(emb, prs, lab)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{plugin_label(self)}: fit() raised {type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc

    def checked_score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """:meth:`score` with validated inputs and output, as float64 of shape (M,)."""
        emb, prs = self._check_inputs(embeddings, pairs)
        try:
            out = self.score(emb, prs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{plugin_label(self)}: score() raised {type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc
        arr = check_array(self, "score() output", out, shape=(prs.shape[0],), kind="f")
        return arr.astype(np.float64, copy=False)
