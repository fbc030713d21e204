"""The :class:`Trainer`: rounds of metric learning on answered pairs, and its batching helpers.

What a round does, the two modes and the patch sources are described in
:mod:`anneal_geo.training`; the losses live in :mod:`anneal_geo.training.losses` and the
model (trunk, projection head) in :mod:`anneal_geo.training.heads`. Importing this module does
not import torch: every function that needs it imports it when called.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from anneal_geo._memory import npy_row_blocks, release_free_memory
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.training.losses import (
    _balanced_contrastive_loss,
    _contrastive_loss,
    _trimmed_contrastive_loss,
    _triplet_loss,
    _TripletSampler,
)

if TYPE_CHECKING:
    import torch

    from anneal_geo.training.heads import MetricModel

__all__ = ["PatchSource", "RoundStats", "SharedFeatures", "Trainer"]

# The logger keeps the name it had before the trainer became a package.
log = logging.getLogger("anneal_geo.training")

# Rows normalised at a time when a fitted trunk turns its raw features into features.
_NORMALISE_BLOCK = 65_536
# Batches between two hand-backs of freed heap memory while a pool is read in batches:
# reading tile windows in threads leaves freed buffers in the allocator's arenas, which grew
# by about 0.9 GB over the feature step of a million patches.
_TRIM_EVERY_BATCHES = 16

#: An array (N, C, H, W) or a ``get_batch(ids) -> float32 array`` function.
PatchSource = np.ndarray | Callable[[np.ndarray], np.ndarray]
Mode = Literal["head", "full"]
LossName = Literal["contrastive", "triplet"]

#: Per-mode defaults: passes over the labelled pairs per round, pairs per batch, and bounds
#: on the steps per round (a round with few pairs still trains; one with a huge implied set
#: stays bounded in time).
_DEFAULTS: dict[str, dict[str, int]] = {
    "head": {"epochs": 20, "batch_pairs": 256, "min_steps": 50, "max_steps": 2000},
    "full": {"epochs": 5, "batch_pairs": 64, "min_steps": 20, "max_steps": 300},
}
#: Most labelled pairs one round trains on (see ``pair_budget``; the session default): with
#: the default epochs and batch a round at 2,000 answers on a 4,000-patch pool (hundreds of
#: thousands of implied pairs) takes well under a second of head training on one CPU thread.
DEFAULT_PAIR_BUDGET = 2048


class SharedFeatures:
    """Trunk features kept inside the mixed embedding instead of beside it.

    With ``mix > 0`` the last ``F`` columns of a head-mode embedding are the L2-normalised
    trunk features times one constant (:class:`~anneal_geo.training.heads.MetricModel`).
    Those columns and each row's feature norm give the features back, to float32 rounding,
    so a session holds its features once: a million patches' 248 texture features are
    1 GB of float32, their norms 4 MB. The embedding's feature columns must stay as the
    first embedding wrote them; :meth:`Trainer.embed` then rewrites the head's columns only.

    Rows are read with ``features[ids]`` (ids: an int array or a slice), like an array's;
    ``np.asarray(features)`` builds the whole (N, F) array.
    """

    def __init__(self, embeddings: np.ndarray, start: int, norms: np.ndarray) -> None:
        self.embeddings = embeddings
        self.start = int(start)
        self.norms = np.ascontiguousarray(norms, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.embeddings), int(self.embeddings.shape[1]) - self.start)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, ids: Any) -> np.ndarray:
        block = self.embeddings[ids, self.start :]
        if np.may_share_memory(block, self.embeddings):  # a slice's view: never write there
            block = block.copy()
        length = np.linalg.norm(block, axis=-1, keepdims=True)
        scale = np.asarray(self.norms[ids], dtype=np.float32)[..., None] / np.maximum(
            length, np.float32(1e-30)
        )
        block *= scale
        return block

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for start in range(0, len(out), _NORMALISE_BLOCK):
            out[start : start + _NORMALISE_BLOCK] = self[start : start + _NORMALISE_BLOCK]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True)
class RoundStats:
    """What one training round did.

    Attributes:
        round: 1 for the first round of this trainer, then 2, 3, ...
        mode: ``"head"`` or ``"full"``.
        loss: the mean loss over the round's steps.
        loss_first: the mean loss over its first 10 % of steps.
        loss_last: the mean loss over its last 10 % of steps.
        steps: optimizer steps taken.
        seconds: wall-clock time of the round.
        n_pairs: labelled pairs given (queried and implied).
        n_similar: of which similar.
        n_dissimilar: of which dissimilar.
        loss_name: ``"contrastive"`` or ``"triplet"`` (what was actually used).
        n_trained: labelled pairs the round drew its batches from (every pair, or the
            round's sample of ``pair_budget`` pairs).
        n_trained_similar: of which similar.
    """

    round: int
    mode: str
    loss: float
    loss_first: float
    loss_last: float
    steps: int
    seconds: float
    n_pairs: int
    n_similar: int
    n_dissimilar: int
    loss_name: str
    n_trained: int = 0
    n_trained_similar: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict."""
        return asdict(self)


class _Getter:
    """Uniform access to a patch source: ``getter(ids) -> float32 array``."""

    def __init__(self, source: PatchSource, n: int | None) -> None:
        if callable(source) and not hasattr(source, "shape"):
            if n is None:
                raise ConfigError("a get_batch function needs n, the number of patches")
            self.array: np.ndarray | None = None
            self.fn: Callable[[np.ndarray], np.ndarray] | None = source
            self.n = int(n)
        else:
            array = source if isinstance(source, np.ndarray) else np.asarray(source)
            if array.ndim != 4:
                raise DataError(f"patches must have shape (N, C, H, W), got {array.shape}")
            if n is not None and int(n) != len(array):
                raise DataError(f"n={n} but the patch array holds {len(array)} patches")
            self.array, self.fn, self.n = array, None, len(array)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.array is not None:
            if len(ids) and ids[-1] - ids[0] + 1 == len(ids) and bool(np.all(np.diff(ids) == 1)):
                batch = self.array[int(ids[0]) : int(ids[-1]) + 1]  # a slice reads a memmap fast
            else:
                batch = self.array[ids]
        else:
            assert self.fn is not None
            batch = self.fn(ids)
        out = np.asarray(batch, dtype=np.float32)
        if out.ndim != 4 or len(out) != len(ids):
            raise DataError(
                f"the patch source returned shape {out.shape} for {len(ids)} ids; "
                "expected (len(ids), C, H, W)"
            )
        return out

    def chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n, batch_size):
            yield np.arange(start, min(start + batch_size, self.n), dtype=np.int64)


class Trainer:
    """Trains a :class:`MetricModel` on answered pairs, round after round (warm start).

    Args:
        model: the metric model (trunk + head), e.g. ``MetricModel(backbone.build(...))``.
        mode: ``"head"`` (train the head on cached trunk features) or ``"full"`` (train
            trunk and head end to end on raw patches).
        loss: ``"contrastive"`` or ``"triplet"`` (anchor-positive-negative triplets formed
            from the pairs around each anchor; falls back to contrastive in a round where no
            patch has both a similar and a dissimilar answer).
        margin: the loss margin m, in embedding distance units (distances lie in [0, 2]).
        lr_head: Adam learning rate of the head.
        lr_trunk: Adam learning rate of the trunk (``"full"`` mode).
        epochs: passes over the round's labelled pairs (all of them, or its sample of
            ``pair_budget``) per round (default 20 head, 5 full).
        batch_pairs: pairs per step, half similar, half dissimilar (default 256 head, 64 full).
        min_steps: fewest steps per round (default 50 head, 20 full).
        max_steps: most steps per round (default 2000 head, 300 full).
        augment: random flips and 90-degree rotations of the patches (``"full"`` mode).
        batch_all: in ``"full"`` mode, the contrastive loss also uses every other labelled
            pair among the patches of a batch (free: their embeddings are computed anyway),
            weighting similar and dissimilar pairs equally.
        seed: seed of the trainer's generator (pair sampling, augmentation).
        device: torch device, ``"cpu"`` by default.
        progress: show tqdm bars while embedding (None: only on a terminal).
        pair_budget: most labelled pairs a round trains on (default 2,048; 0 = every
            pair). When the labelled set is larger, each round keeps every queried pair
            (``implied`` False in :meth:`train_round`) and draws the rest afresh from the
            implied pairs, as many similar as dissimilar where both are there, so the steps
            of a round, ``epochs * min(pairs, pair_budget) / batch_pairs`` within
            ``min_steps``..``max_steps``, do not grow with the implied pairs.
        trim: from the second round on, each contrastive batch of pairs (not the triplet
            or ``batch_all`` batches) leaves out this share of its similar and of its
            dissimilar pairs with the largest loss (0: none).
        ema: decay per step of an exponential moving average of the trained weights (0:
            none). With it, the model holds the averaged weights between rounds (they embed,
            are saved and exported), while training continues from the weights it last
            trained (kept as ``train_weights`` in :meth:`state_dict`); each step moves the
            average ``1 - ema`` of the way to the new weights.

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        model: MetricModel,
        *,
        mode: Mode = "head",
        loss: LossName = "contrastive",
        margin: float = 0.5,
        lr_head: float = 1e-3,
        lr_trunk: float = 1e-4,
        epochs: float | None = None,
        batch_pairs: int | None = None,
        min_steps: int | None = None,
        max_steps: int | None = None,
        augment: bool = True,
        batch_all: bool = True,
        seed: int = 0,
        device: str = "cpu",
        progress: bool | None = None,
        pair_budget: int | None = None,
        trim: float = 0.0,
        ema: float = 0.0,
    ) -> None:
        import torch

        if mode not in _DEFAULTS:
            raise ConfigError(f"trainer mode must be 'head' or 'full', got {mode!r}")
        if loss not in ("contrastive", "triplet"):
            raise ConfigError(f"trainer loss must be 'contrastive' or 'triplet', got {loss!r}")
        defaults = _DEFAULTS[mode]
        self.model = model.to(device)
        self.mode: Mode = mode
        self.loss_name: LossName = loss
        self.margin = float(margin)
        self.lr_head = float(lr_head)
        self.lr_trunk = float(lr_trunk)
        self.epochs = float(defaults["epochs"] if epochs is None else epochs)
        self.batch_pairs = int(defaults["batch_pairs"] if batch_pairs is None else batch_pairs)
        self.max_steps = int(defaults["max_steps"] if max_steps is None else max_steps)
        self.min_steps = int(
            min(defaults["min_steps"], self.max_steps) if min_steps is None else min_steps
        )
        self.augment = bool(augment)
        self.batch_all = bool(batch_all)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.progress = progress
        self.pair_budget = int(DEFAULT_PAIR_BUDGET if pair_budget is None else pair_budget)
        self.trim = float(trim)
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"trainer setting trim must lie in [0, 0.5), got {trim}")
        self.ema = float(ema)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"trainer setting ema must lie in [0, 1), got {ema}")
        for name, value in (
            ("margin", self.margin),
            ("lr_head", self.lr_head),
            ("lr_trunk", self.lr_trunk),
            ("epochs", self.epochs),
        ):
            if not value > 0:
                raise ConfigError(f"trainer setting {name} must be positive, got {value}")
        if self.batch_pairs < 2:
            raise ConfigError(f"trainer setting batch_pairs must be at least 2, got {batch_pairs}")
        if self.pair_budget < 0 or 0 < self.pair_budget < 2:
            raise ConfigError(
                f"trainer setting pair_budget must be 0 (every pair) or at least 2, got "
                f"{pair_budget}"
            )
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(
                "trainer settings need 1 <= min_steps <= max_steps, got "
                f"{self.min_steps}, {self.max_steps}"
            )

        self.generator = torch.Generator().manual_seed(self.seed)
        groups: list[dict[str, Any]] = [
            {"params": list(model.head.parameters()), "lr": self.lr_head, "name": "head"}
        ]
        trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
        if mode == "full" and trunk_params:
            groups.append({"params": trunk_params, "lr": self.lr_trunk, "name": "trunk"})
        self.optimizer = torch.optim.Adam(groups)
        #: The optimised parameters, in the optimiser's order.
        self._trained = [p for g in groups for p in g["params"]]
        #: With ``ema``: the weights training continues from (None before the first round).
        self._train_weights: list[torch.Tensor] | None = None
        self.rounds = 0
        self._features: torch.Tensor | SharedFeatures | None = None

    # ------------------------------------------------------------------ features (head mode)

    @property
    def features(self) -> np.ndarray | SharedFeatures | None:
        """The cached trunk features (N, trunk.out_dim) float32, or None; after
        :meth:`share_features`, a :class:`SharedFeatures` that reads their rows from the
        embedding."""
        if self._features is None or isinstance(self._features, SharedFeatures):
            return self._features
        return self._features.cpu().numpy()

    @property
    def can_share_features(self) -> bool:
        """Whether :meth:`share_features` can keep the features inside the embedding: head
        mode, ``mix > 0`` and the CPU."""
        return self.mode == "head" and self.device.type == "cpu" and float(self.model.mix) > 0.0

    def release_features(self) -> None:
        """Let go of the cached trunk features held in memory (e.g. once
        :meth:`cache_features` has saved them, to share them from the file)."""
        self._features = None
        release_free_memory()

    def share_features(self, embeddings: np.ndarray, saved: str | Path | None = None) -> bool:
        """Keep the cached features inside ``embeddings`` (see :class:`SharedFeatures`),
        let go of the separate copy, and return True.

        Needs :attr:`can_share_features` and an (N, D) C-contiguous float32 array
        (``D = embedding_dim``); otherwise nothing changes and False is returned.
        ``embeddings`` (its values are not read: ``np.empty`` will do) is written with this
        model's embedding of the features: the feature columns as ``mix / sqrt(1 + mix**2)``
        times the normalised features, then the head's columns from the features as read
        back from them. Every later embedding (:meth:`embed`, training, a resumed session)
        reads the same values back, so a session's embeddings are the same whether it ran
        on or was resumed.

        ``saved``: the features are read from this ``.npy`` (as :meth:`cache_features`
        saves them) a block of rows at a time, never whole, instead of from the features
        held (let go of first): a million patches' set-up then holds the embedding alone
        (1.4 GB) rather than it and the features (1 GB). The values written are the same.

        Raises:
            DataError: ``saved`` is not a float32 matrix of the trunk's width, ends early
                or holds NaN or infinite values (found while it is read: the features
                held are gone by then, and ``embeddings`` is partly written).
        """
        import torch

        features = self._features
        if isinstance(features, SharedFeatures):
            return features.embeddings is embeddings
        if not self.can_share_features or (
            saved is None and not isinstance(features, torch.Tensor)
        ):
            return False
        blocks: Iterator[Any]
        if saved is None:
            assert isinstance(features, torch.Tensor)
            n, width = int(features.shape[0]), int(features.shape[1])
            blocks = (features[i : i + _NORMALISE_BLOCK] for i in range(0, n, _NORMALISE_BLOCK))
        else:
            remedy = "compute the trunk features again"
            (n, width), read = npy_row_blocks(Path(saved), _NORMALISE_BLOCK, remedy)
            if width != self.model.trunk_dim:
                raise DataError(
                    f"{saved} holds ({n}, {width}) features, expected (N, "
                    f"{self.model.trunk_dim}); {remedy}"
                )
            blocks = (torch.from_numpy(_finite(block, saved, remedy)) for block in read)
        start = int(self.model.out_dim)
        if not (
            isinstance(embeddings, np.ndarray)
            and embeddings.dtype == np.float32
            and embeddings.shape == (n, start + width)
            and embeddings.flags.c_contiguous
            and embeddings.flags.writeable
        ):
            return False
        if saved is not None:
            features = None
            self.release_features()
        mix = float(self.model.mix)
        norms = _write_unit_columns(blocks, n, embeddings, start, mix / math.sqrt(1.0 + mix * mix))
        shared = SharedFeatures(embeddings, start, norms)
        self._features = shared
        # The separate features go before the head's pass: they and its temporaries were
        # the peak of a million-patch session's set-up.
        del features, blocks
        release_free_memory()
        self._embed_shared(shared, embeddings)
        return True

    @property
    def trunk_fits_statistics(self) -> bool:
        """Whether the trunk fits pool statistics before its features mean anything: it has
        ``raw_features(x)`` and ``fit_statistics(raw)`` (e.g. the ``texture`` backbone's
        trunk), and a boolean ``fitted`` attribute (False until fitted)."""
        trunk = self.model.trunk
        return callable(getattr(trunk, "fit_statistics", None)) and callable(
            getattr(trunk, "raw_features", None)
        )

    @property
    def trunk_fitted(self) -> bool:
        """False only for a trunk that fits statistics and has not been fitted yet."""
        return not self.trunk_fits_statistics or bool(getattr(self.model.trunk, "fitted", False))

    @staticmethod
    def trunk_state_path(path: str | Path) -> Path:
        """Where :meth:`cache_features` keeps the fitted trunk's state next to the features
        file ``path`` (``NAME.npy`` -> ``NAME.trunk.pt``)."""
        target = Path(path)
        return target.with_name(target.stem + ".trunk.pt")

    def cache_features(
        self,
        source: PatchSource,
        n: int | None = None,
        *,
        batch_size: int = 256,
        path: str | Path | None = None,
    ) -> np.ndarray:
        """Compute the trunk features of every patch once and keep them for head training.

        A trunk that fits pool statistics (:attr:`trunk_fits_statistics`) and is not fitted
        yet is fitted here, on these patches: its raw features are streamed in chunks of
        ``batch_size`` (batches of 1,024 were slower than 256 for the ``texture`` trunk and
        held 0.3-0.7 GB more while they ran), ``fit_statistics`` gets all of them, and the
        features are the normalised raw ones. A fitted trunk is never fitted again, so the
        pool it was fitted on stays its reference (new patches are embedded with the saved
        statistics).

        Args:
            source: the patches (array or ``get_batch`` function, see the module docs).
            n: the number of patches when ``source`` is a function.
            batch_size: patches per forward pass.
            path: also save the features there as ``.npy`` (reuse them later with
                :meth:`set_features`; they are valid while the trunk and pool are unchanged),
                and, for a trunk that fits statistics, its state next to it
                (:meth:`trunk_state_path`, read back with :meth:`load_trunk_state`). Both
                are written atomically, the state first.

        Returns:
            the features, (N, trunk.out_dim) float32.
        """
        getter = _Getter(source, n)
        if self.trunk_fitted:
            features = self._run_batches(self.model.trunk, getter, batch_size, "features")
        else:
            features = self._fit_trunk(getter, batch_size)
        self.set_features(features)
        if path is not None:
            if self.trunk_fits_statistics:
                self.save_trunk_state(self.trunk_state_path(path))
            _atomic_save(Path(path), lambda handle: np.save(handle, features))
        return features

    def _fit_trunk(self, getter: _Getter, batch_size: int) -> np.ndarray:
        """Fit the trunk's statistics on every patch of ``getter``; its normalised features."""
        import torch

        trunk: Any = self.model.trunk
        raw = self._run_batches(
            trunk, getter, batch_size, "trunk statistics", call=trunk.raw_features
        )
        try:
            trunk.fit_statistics(raw)
        except ValueError as exc:
            raise DataError(f"cannot fit the trunk's pool statistics: {exc}") from exc
        normalise = getattr(trunk, "normalise", None)
        if not callable(normalise):
            return self._run_batches(trunk, getter, batch_size, "features")
        raw = np.ascontiguousarray(raw, dtype=np.float32)
        if raw.shape[1] != self.model.trunk_dim:  # normalising changes the width: at once
            with torch.inference_mode():
                out = normalise(torch.from_numpy(raw).to(self.device)).float().cpu().numpy()
            return np.ascontiguousarray(out, dtype=np.float32)
        # Block by block, written over the raw features: normalising a million rows at
        # once held the raw features, the result and a temporary of each (4 GB at 1M x 248).
        with torch.inference_mode():
            for start in range(0, len(raw), _NORMALISE_BLOCK):
                block = torch.from_numpy(raw[start : start + _NORMALISE_BLOCK]).to(self.device)
                raw[start : start + len(block)] = normalise(block).float().cpu().numpy()
        return raw

    def save_trunk_state(self, path: str | Path) -> None:
        """Write the trunk's state dict (its fitted statistics) to ``path``, atomically."""
        import torch

        state = {k: v.detach().cpu() for k, v in self.model.trunk.state_dict().items()}
        _atomic_save(Path(path), lambda handle: torch.save(state, handle))

    def load_trunk_state(self, path: str | Path) -> bool:
        """Load a trunk state written by :meth:`save_trunk_state`; True when it loaded and
        left the trunk fitted, False (trunk unchanged) when the file is missing, unreadable
        or does not fit."""
        import torch

        target = Path(path)
        if not target.is_file():
            return False
        try:
            state = torch.load(target, map_location=self.device, weights_only=True)
            self.model.trunk.load_state_dict(state)
        except Exception as exc:  # any damage means: fit again
            log.warning("%s cannot be used (%s); fitting the trunk again", target, exc)
            return False
        return self.trunk_fitted

    def set_features(self, features: np.ndarray) -> None:
        """Use precomputed trunk features (N, trunk.out_dim), e.g. loaded from a ``.npy``."""
        import torch

        arr = np.asarray(features, dtype=np.float32)
        want = self.model.trunk_dim
        if arr.ndim != 2 or arr.shape[1] != want:
            raise DataError(f"cached features have shape {arr.shape}, expected (N, {want})")
        if not np.isfinite(arr).all():
            raise DataError("cached features contain NaN or infinite values; recompute them")
        self._features = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    # ------------------------------------------------------------------ training

    def train_round(
        self,
        pairs: np.ndarray,
        labels: np.ndarray,
        source: PatchSource | None = None,
        n: int | None = None,
        *,
        implied: np.ndarray | None = None,
    ) -> RoundStats:
        """Train on the labelled pairs for one round, continuing from the previous round.

        Args:
            pairs: (M, 2) int patch ids.
            labels: (M,) answers, 1 similar, 0 dissimilar; -1 (skipped) rows are ignored.
            source: the patches, required in ``"full"`` mode (ignored in ``"head"`` mode,
                which uses the cached features).
            n: the number of patches when ``source`` is a function.
            implied: (M,) bool, True for pairs implied by transitivity (not asked). Beyond
                ``pair_budget`` pairs, the queried ones are always trained on and the
                implied ones sampled; without it every pair may be left out of the sample.

        Returns:
            the round's :class:`RoundStats`.

        Raises:
            DataError: malformed pairs or labels, ids out of range, no labelled pair, or
                (head mode) no cached features.
        """
        import torch

        start = time.perf_counter()
        getter: _Getter | None = None
        if self.mode == "head":
            if self._features is None:
                raise DataError("head mode needs cached trunk features; call cache_features()")
            n_patches = len(self._features)
        else:
            if source is None:
                raise DataError("full mode needs the patches: pass source= to train_round()")
            getter = _Getter(source, n)
            n_patches = getter.n
        if implied is not None:
            implied = np.asarray(implied, dtype=bool)
            if implied.shape != (len(np.asarray(pairs)),):
                raise DataError(
                    f"implied must have shape ({len(np.asarray(pairs))},), got {implied.shape}"
                )
        pairs, labels, implied = _check_pairs(pairs, labels, n_patches, implied)
        n_similar_all = int(np.count_nonzero(labels == 1))
        rows_round = self._round_sample(labels, implied)
        similar = rows_round[labels[rows_round] == 1]
        dissimilar = rows_round[labels[rows_round] == 0]
        steps = int(
            min(
                self.max_steps,
                max(self.min_steps, math.ceil(self.epochs * len(rows_round) / self.batch_pairs)),
            )
        )
        lookup = (
            _PairLookup(pairs, labels, n_patches)
            if self.mode == "full" and self.batch_all
            else None
        )
        triplets = (
            _TripletSampler(pairs[rows_round], labels[rows_round])
            if self.loss_name == "triplet"
            else None
        )
        use_triplets = triplets is not None and triplets.possible
        if triplets is not None and not use_triplets:
            log.warning(
                "no patch has both a similar and a dissimilar answer yet; this round "
                "uses the contrastive loss"
            )

        self._train_mode()
        averaged = self._start_averaging()
        losses = np.empty(steps, dtype=np.float64)
        for step in range(steps):
            if use_triplets:
                assert triplets is not None
                ids = triplets.sample(self.batch_pairs, self.generator)
                emb = self._embed_ids(ids.reshape(-1), getter).reshape(len(ids), 3, -1)
                loss = _triplet_loss(emb[:, 0], emb[:, 1], emb[:, 2], self.margin)
            elif lookup is not None:
                rows = _balanced_rows(similar, dissimilar, self.batch_pairs, self.generator)
                unique = np.unique(pairs[rows])
                emb = self._embed_ids(unique, getter)
                a, b, found = lookup.among(unique)
                y = torch.as_tensor(found, dtype=torch.float32, device=self.device)
                ia = torch.from_numpy(a).to(self.device)
                ib = torch.from_numpy(b).to(self.device)
                loss = _balanced_contrastive_loss(
                    emb.index_select(0, ia), emb.index_select(0, ib), y, self.margin
                )
            else:
                rows = _balanced_rows(similar, dissimilar, self.batch_pairs, self.generator)
                batch = pairs[rows]
                emb = self._embed_ids(batch.reshape(-1), getter).reshape(len(batch), 2, -1)
                y = torch.as_tensor(labels[rows], dtype=torch.float32, device=self.device)
                if self.trim > 0 and self.rounds >= 1:
                    loss = _trimmed_contrastive_loss(
                        emb[:, 0], emb[:, 1], y, self.margin, self.trim
                    )
                else:
                    loss = _contrastive_loss(emb[:, 0], emb[:, 1], y, self.margin)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if averaged is not None:
                with torch.no_grad():
                    for mean, weight in zip(averaged, self._trained, strict=True):
                        mean.lerp_(weight, 1.0 - self.ema)
            losses[step] = float(loss.detach())
        if averaged is not None:
            self._finish_averaging(averaged)
        self.model.eval()
        self.rounds += 1
        tenth = max(1, steps // 10)
        stats = RoundStats(
            round=self.rounds,
            mode=self.mode,
            loss=float(losses.mean()),
            loss_first=float(losses[:tenth].mean()),
            loss_last=float(losses[-tenth:].mean()),
            steps=steps,
            seconds=time.perf_counter() - start,
            n_pairs=len(pairs),
            n_similar=n_similar_all,
            n_dissimilar=len(pairs) - n_similar_all,
            loss_name="triplet" if use_triplets else "contrastive",
            n_trained=len(rows_round),
            n_trained_similar=len(similar),
        )
        log.info("training round %d: %s", self.rounds, stats.as_dict())
        return stats

    def _round_sample(self, labels: np.ndarray, implied: np.ndarray | None) -> np.ndarray:
        """Rows of the labelled pairs this round trains on (sorted): every row within
        ``pair_budget``; beyond it every queried row plus implied rows drawn without
        replacement, half similar and half dissimilar (the rest from the other answer when
        one runs short)."""
        import torch

        n = len(labels)
        budget = self.pair_budget
        if budget == 0 or n <= budget:
            return np.arange(n, dtype=np.int64)
        keep = np.zeros(n, dtype=bool) if implied is None else ~implied
        kept = np.flatnonzero(keep)
        room = max(0, budget - len(kept))
        rest = np.flatnonzero(~keep)
        sim = rest[labels[rest] == 1]
        dis = rest[labels[rest] == 0]
        take_sim = min(len(sim), room // 2)
        take_dis = min(len(dis), room - take_sim)
        take_sim = min(len(sim), room - take_dis)

        def draw(rows: np.ndarray, k: int) -> np.ndarray:
            if k >= len(rows):
                return rows
            return rows[torch.randperm(len(rows), generator=self.generator)[:k].numpy()]

        chosen = np.concatenate([kept, draw(sim, take_sim), draw(dis, take_dis)])
        return np.sort(chosen.astype(np.int64))

    def _start_averaging(self) -> list[torch.Tensor] | None:
        """With ``ema``: the average so far (the weights the model holds between rounds),
        after putting the weights training continues from into the model; else None."""
        import torch

        if self.ema == 0.0:
            return None
        with torch.no_grad():
            averaged = [p.detach().clone() for p in self._trained]
            if self._train_weights is not None:
                for p, w in zip(self._trained, self._train_weights, strict=True):
                    p.copy_(w)
        return averaged

    def _finish_averaging(self, averaged: list[torch.Tensor]) -> None:
        """Keep the trained weights aside and give the model the average."""
        import torch

        with torch.no_grad():
            self._train_weights = [p.detach().clone() for p in self._trained]
            for p, mean in zip(self._trained, averaged, strict=True):
                p.copy_(mean)

    def _train_mode(self) -> None:
        self.model.train()
        if self.mode == "head":
            # The trunk is frozen: its batch-norm statistics must not drift.
            self.model.trunk.eval()

    def _embed_ids(self, ids: np.ndarray, getter: _Getter | None) -> torch.Tensor:
        """Embeddings (with gradients) of the patches ``ids`` (repeats allowed)."""
        import torch

        if self.mode == "head":
            assert self._features is not None
            index = torch.from_numpy(ids).to(self.device)
            if isinstance(self._features, SharedFeatures):
                return self.model.embed_features(torch.from_numpy(self._features[ids]))
            return self.model.embed_features(self._features.index_select(0, index))
        assert getter is not None
        unique, inverse = np.unique(ids, return_inverse=True)
        x = torch.from_numpy(getter(unique)).to(self.device)
        if self.augment:
            x = _dihedral(x, self.generator)
        emb = self.model(x)
        return emb.index_select(0, torch.from_numpy(inverse.reshape(-1)).to(self.device))

    # ------------------------------------------------------------------ embedding

    def embed(
        self,
        source: PatchSource | None = None,
        n: int | None = None,
        *,
        batch_size: int = 256,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """L2-normalised embeddings of the whole pool, (N, D) float32 (D: the model's
        ``embedding_dim``).

        Head mode uses the cached trunk features (a pass of the head only; ``source`` is
        used only when nothing is cached yet, and is then cached); full mode runs the whole
        model on ``source``. In head mode, ``out`` (an (N, D) float32 array, e.g. the
        previous embeddings) is written over and returned when its shape fits, so a big
        pool's embeddings are never held twice; full mode ignores it.
        """
        if self.mode == "head":
            if self._features is None:
                if source is None:
                    raise DataError("nothing to embed: pass the patches or call cache_features()")
                self.cache_features(source, n, batch_size=batch_size)
            if isinstance(self._features, SharedFeatures):
                return self._embed_shared(self._features, out)
            return self.embed_features(self.features, out=out)  # type: ignore[arg-type]
        if source is None:
            raise DataError("full mode embeds raw patches: pass source= to embed()")
        return self.embed_patches(source, n, batch_size=batch_size)

    def _embed_shared(self, shared: SharedFeatures, out: np.ndarray | None) -> np.ndarray:
        """:meth:`embed` from shared features: the head's columns are computed, the feature
        columns are the shared embedding's (copied when ``out`` is another array; one that
        does not fit is not written, a new one is returned)."""
        import torch

        emb = shared.embeddings
        fits = (
            isinstance(out, np.ndarray)
            and out.shape == emb.shape
            and out.dtype == np.float32
            and out.flags.writeable
            and (out is emb or not np.may_share_memory(out, emb))
        )
        if not fits:
            out = np.empty(emb.shape, dtype=np.float32)
        assert out is not None
        head = shared.start
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(emb), _NORMALISE_BLOCK):
                rows = slice(start, start + _NORMALISE_BLOCK)
                chunk = torch.from_numpy(shared[rows]).to(self.device)
                out[rows, :head] = self.model.embed_features(chunk)[:, :head].cpu().numpy()
                if out is not emb:
                    out[rows, head:] = emb[rows, head:]
        return out

    def embed_patches(
        self, source: PatchSource, n: int | None = None, *, batch_size: int = 256
    ) -> np.ndarray:
        """Run the whole model (trunk, head, normalisation) on raw patches in chunks.

        Args:
            source: an array (N, C, H, W) or ``get_batch(ids)`` with ``n``; chunks of
                ``batch_size`` consecutive ids are requested, so a large pool never sits in
                memory as float32 at once.
            n: the number of patches when ``source`` is a function.
            batch_size: patches per forward pass.

        Returns:
            (N, D) float32, L2-normalised rows.
        """
        return self._run_batches(self.model, _Getter(source, n), batch_size, "embedding")

    def embed_features(
        self, features: np.ndarray, *, batch_size: int = 65536, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The head, mixing and L2 normalisation on trunk features (N, trunk.out_dim),
        written into ``out`` when it is an (N, D) C-contiguous float32 array, else into a
        new one."""
        import torch

        arr = np.asarray(features, dtype=np.float32)
        self.model.eval()
        # One preallocated array, not a list of blocks concatenated at the end: at a million
        # patches that would hold the embeddings twice.
        shape = (len(arr), self.model.embedding_dim)
        fits = (
            isinstance(out, np.ndarray)
            and out.shape == shape
            and out.dtype == np.float32
            and out.flags.c_contiguous
            and out.flags.writeable
            and not np.may_share_memory(out, arr)
        )
        if not fits:
            out = np.empty(shape, dtype=np.float32)
        assert out is not None
        with torch.inference_mode():
            for start in range(0, len(arr), batch_size):
                chunk = torch.from_numpy(arr[start : start + batch_size]).to(self.device)
                out[start : start + len(chunk)] = self.model.embed_features(chunk).cpu().numpy()
        return out

    def _run_batches(
        self,
        module: torch.nn.Module,
        getter: _Getter,
        batch_size: int,
        what: str,
        call: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        was_training = module.training
        module.eval()
        # Each batch is written into one preallocated array: keeping the small outputs in a
        # list between the large temporary batches fragments the heap (measured +0.8 GB
        # against +0.17 GB on a 50,000-patch pool).
        out: np.ndarray | None = None
        disable = None if self.progress is None else not self.progress
        with torch.inference_mode():
            batches = tqdm(
                getter.chunks(batch_size),
                total=math.ceil(getter.n / batch_size),
                desc=what,
                unit="batch",
                disable=disable,
                leave=False,
            )
            for done, ids in enumerate(batches, start=1):
                x = torch.from_numpy(getter(ids)).to(self.device)
                y = (module if call is None else call)(x).float().cpu().numpy()
                if out is None:
                    out = np.empty((getter.n, y.shape[1]), dtype=np.float32)
                out[int(ids[0]) : int(ids[-1]) + 1] = y
                if done % _TRIM_EVERY_BATCHES == 0:
                    release_free_memory()
        module.train(was_training)
        release_free_memory()
        if out is None:
            dim = getattr(module, "embedding_dim", getattr(module, "out_dim", 0))
            return np.zeros((0, int(dim)), dtype=np.float32)
        result = out
        if not np.isfinite(result).all():
            raise DataError(f"the model produced NaN or infinite {what}; check the patches")
        return result

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and generator state: tensors and plain values only, so
        ``torch.load(..., weights_only=True)`` reads it back."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rounds": self.rounds,
            "mode": self.mode,
            "loss": self.loss_name,
        }
        if self._train_weights is not None:
            state["train_weights"] = [w.clone() for w in self._train_weights]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same architecture and mode); cached features are not
        part of it (recompute or :meth:`set_features` them)."""
        if state.get("mode") != self.mode:
            raise ConfigError(
                f"checkpoint was trained in mode {state.get('mode')!r}, this trainer is in "
                f"mode {self.mode!r}; use the same mode to resume"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise DataError(
                f"checkpoint does not fit this model ({str(exc).splitlines()[0]}); resume with "
                "the same backbone and bands"
            ) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rounds = int(state["rounds"])
        weights = state.get("train_weights")
        if weights is not None:
            if len(weights) != len(self._trained) or any(
                tuple(w.shape) != tuple(p.shape)
                for w, p in zip(weights, self._trained, strict=False)
            ):
                raise DataError(
                    "checkpoint's train_weights do not fit this model; resume with the same "
                    "backbone and bands"
                )
            self._train_weights = [
                w.to(p.device, p.dtype) for w, p in zip(weights, self._trained, strict=True)
            ]
        else:
            self._train_weights = None


def _write_unit_columns(
    blocks: Iterable[torch.Tensor], n: int, embeddings: np.ndarray, start: int, scale: float
) -> np.ndarray:
    """Write ``scale`` times the L2-normalised features into the columns ``start:`` of
    ``embeddings``, from ``blocks`` of consecutive rows of them (``n`` rows in all); return
    the rows' norms, (N,) float32."""
    import torch

    norms = np.empty(n, dtype=np.float32)
    first = 0
    with torch.inference_mode():
        for block in blocks:
            rows = slice(first, first + len(block))
            length = torch.linalg.vector_norm(block, dim=1, keepdim=True)
            norms[rows] = length[:, 0].numpy()
            embeddings[rows, start:] = (block / length.clamp_min(1e-12) * scale).numpy()
            first += len(block)
    if first != n:
        raise DataError(f"{n} rows of features expected, {first} read")
    return norms


def _finite(block: np.ndarray, path: str | Path, remedy: str) -> np.ndarray:
    """``block`` of features read from ``path``, checked for NaN and infinite values."""
    if not np.isfinite(block).all():
        raise DataError(f"{path} holds NaN or infinite values; {remedy}")
    return block


def _atomic_save(target: Path, write: Callable[[Any], None]) -> None:
    """``write(handle)`` into a temporary file next to ``target``, then rename: a killed
    process never leaves a truncated file behind."""
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


# ---------------------------------------------------------------------- batching helpers


def _check_pairs(
    pairs: np.ndarray, labels: np.ndarray, n: int, implied: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (pairs int64 (M, 2), labels int64 (M,), implied) with skipped (-1) rows
    dropped."""
    p = np.asarray(pairs)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] != 2 or p.dtype.kind not in "iu":
        raise DataError(f"pairs must be an (M, 2) integer array, got {p.dtype} {p.shape}")
    if y.shape != (len(p),):
        raise DataError(f"labels must have shape ({len(p)},), got {y.shape}")
    keep = y != -1
    p, y = p[keep].astype(np.int64), y[keep].astype(np.int64)
    if implied is not None:
        implied = implied[keep]
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels must be 1 (similar), 0 (dissimilar) or -1 (skipped)")
    if len(p) == 0:
        raise DataError("no labelled pairs to train on")
    if p.min() < 0 or p.max() >= n:
        raise DataError(f"pair ids must lie in 0..{n - 1}, got {p.min()}..{p.max()}")
    same = np.flatnonzero(p[:, 0] == p[:, 1])
    if len(same):
        raise DataError(f"pair ({p[same[0], 0]}, {p[same[0], 1]}) joins a patch to itself")
    return p, y, implied


def _balanced_rows(
    similar: np.ndarray, dissimilar: np.ndarray, batch: int, generator: torch.Generator
) -> np.ndarray:
    """Row indices of a batch: half similar, half dissimilar, drawn with replacement; all
    from one class when the other has no pair yet."""
    import torch

    if len(similar) and len(dissimilar):
        half = batch // 2
        a = torch.randint(len(similar), (half,), generator=generator).numpy()
        b = torch.randint(len(dissimilar), (batch - half,), generator=generator).numpy()
        return np.concatenate([similar[a], dissimilar[b]])
    only = similar if len(similar) else dissimilar
    return only[torch.randint(len(only), (batch,), generator=generator).numpy()]


class _PairLookup:
    """Finds the labelled pairs among a set of patches (vectorised, by sorted pair keys)."""

    def __init__(self, pairs: np.ndarray, labels: np.ndarray, n: int) -> None:
        lo, hi = pairs.min(axis=1), pairs.max(axis=1)
        keys = lo * np.int64(n) + hi
        order = np.argsort(keys, kind="stable")
        self.keys, self.labels, self.n = keys[order], labels[order], np.int64(n)

    def among(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, labels): positions in ``ids`` (sorted, unique) of every labelled pair."""
        a, b = np.triu_indices(len(ids), 1)
        keys = ids[a] * self.n + ids[b]
        pos = np.searchsorted(self.keys, keys)
        pos_ok = np.minimum(pos, len(self.keys) - 1)
        hit = self.keys[pos_ok] == keys
        return a[hit], b[hit], self.labels[pos_ok[hit]]


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip / 90-degree rotation of each patch (rotations only for square ones)."""
    import torch

    rotations = 4 if x.shape[-1] == x.shape[-2] else 1
    k = torch.randint(rotations, (len(x),), generator=generator)
    flip = torch.randint(2, (len(x),), generator=generator).bool()
    out = x.clone()
    for turns in range(rotations):
        for mirrored in (False, True):
            mask = (k == turns) & (flip == mirrored)
            if not bool(mask.any()) or (turns == 0 and not mirrored):
                continue
            part = x[mask]
            if mirrored:
                part = part.flip(-1)
            out[mask] = torch.rot90(part, turns, dims=(-2, -1)) if turns else part
    return out
