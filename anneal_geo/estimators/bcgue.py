"""BCGUE: binary-classifier-guided uncertainty estimation (METHOD.md section 3.3).

A small MLP predicts p_ij = P(similar) from the symmetric pair feature
``g_ij = [|f_i - f_j|, f_i * f_j]``; the less confident it is, the more uncertain the pair:
``u = 1 - |2 p_ij - 1|``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import ConfigError
from anneal_geo.estimators.base import Estimator

if TYPE_CHECKING:
    import torch

__all__ = ["BCGUEEstimator"]

#: Pairs pushed through the network at a time when scoring.
SCORE_BATCH = 65_536

#: Labelled pairs used to estimate the feature standardisation (a seeded subsample above).
_STATS_PAIRS = 65_536


def _pair_features(emb: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``[|f_i - f_j|, f_i * f_j]``: both halves are exactly symmetric in the pair order."""
    import torch

    a = emb.index_select(0, pairs[:, 0])
    b = emb.index_select(0, pairs[:, 1])
    dim = a.shape[1]
    # Written into one buffer: about twice as fast as torch.cat on large blocks.
    out = torch.empty(a.shape[0], 2 * dim, dtype=a.dtype)
    torch.sub(a, b, out=out[:, :dim])
    out[:, :dim].abs_()
    torch.mul(a, b, out=out[:, dim:])
    return out


class BCGUEEstimator(Estimator):
    """BCGUE: an MLP classifies pairs as similar/dissimilar; uncertainty = 1 - |2p - 1|.

    The network is ``2D -> hidden -> 1`` (ReLU, dropout, sigmoid) on the pair feature
    ``[|f_i - f_j|, f_i * f_j]``, standardised per dimension with statistics of the
    labelled pairs (L2-normalised embeddings make the raw feature values tiny, which
    would make training slow). Each :meth:`fit` trains with class-balanced binary
    cross-entropy (each class weighs half, whatever the ratio of similar to dissimilar
    pairs) using Adam, starting from the previous fit's weights when the embedding
    dimension is unchanged and from a fresh seeded initialisation otherwise. A fit
    runs ``epochs`` passes over the labelled pairs but at most ``max_steps`` minibatch
    steps, so its cost stays bounded when transitivity implies many pairs. Training runs
    on one torch thread (restored afterwards): minibatches this small gain nothing from
    more, and busy cores made multi-threaded training 20 times slower.

    Everything random (initialisation, shuffling, dropout) is drawn inside a forked torch
    RNG seeded from ``seed`` and the fit count, so results repeat exactly for a seed and
    the caller's global torch RNG is left untouched.

    Before the first fit, and after a fit that saw only one class (recorded in
    :attr:`fallback_reason`), scores come from the untrained (or previous) network and
    are close to arbitrary. Pairs labelled anything but 0 or 1 are ignored by ``fit``.

    Args:
        seed: seed of initialisation, shuffling and dropout.
        hidden: width of the hidden layer.
        dropout: dropout probability after the hidden layer.
        epochs: passes over the labelled pairs per fit.
        lr: Adam learning rate.
        batch_size: labelled pairs per step.
        weight_decay: Adam weight decay.
        max_steps: cap on the optimisation steps of one fit.
        **options: passed on to :class:`~anneal_geo.estimators.base.Estimator`.

    Raises:
        ConfigError: a setting is out of range.
    """

    needs_labels = True

    def __init__(
        self,
        seed: int = 0,
        hidden: int = 256,
        dropout: float = 0.1,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 256,
        weight_decay: float = 1e-4,
        max_steps: int = 1000,
        **options: Any,
    ) -> None:
        checks = {
            "hidden": (hidden, int(hidden) >= 1, ">= 1"),
            "dropout": (dropout, 0.0 <= float(dropout) < 1.0, "in [0, 1)"),
            "epochs": (epochs, int(epochs) >= 1, ">= 1"),
            "lr": (lr, float(lr) > 0.0, "> 0"),
            "batch_size": (batch_size, int(batch_size) >= 1, ">= 1"),
            "weight_decay": (weight_decay, float(weight_decay) >= 0.0, ">= 0"),
            "max_steps": (max_steps, int(max_steps) >= 1, ">= 1"),
        }
        for name, (value, ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"bcgue estimator: {name} must be {rule}, got {value!r}")
        super().__init__(
            seed,
            hidden=int(hidden),
            dropout=float(dropout),
            epochs=int(epochs),
            lr=float(lr),
            batch_size=int(batch_size),
            weight_decay=float(weight_decay),
            max_steps=int(max_steps),
            **options,
        )
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.max_steps = int(max_steps)
        self.fallback_reason: str | None = None
        #: mean class-balanced loss of the last epoch of the last fit (None before).
        self.train_loss_: float | None = None
        self.fits = 0
        self._model: torch.nn.Module | None = None
        self._dim: int | None = None
        self._mean: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None

    # -- internals -----------------------------------------------------------------------

    def _build(self, dim: int) -> torch.nn.Module:
        """A freshly initialised network (call inside the forked, seeded RNG)."""
        from torch import nn

        return nn.Sequential(
            nn.Linear(2 * dim, self.hidden),
            nn.ReLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden, 1),
        )

    def _ensure_model(self, dim: int) -> torch.nn.Module:
        """The current network, or a new seeded one when none exists or D changed."""
        import torch

        if self._model is None or self._dim != dim:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._model = self._build(dim)
            self._dim = dim
            self._mean = torch.zeros(2 * dim)
            self._scale = torch.ones(2 * dim)
        return self._model

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Standardise freshly computed features in place (they are never reused raw)."""
        assert self._mean is not None and self._scale is not None
        return features.sub_(self._mean).div_(self._scale)

    def _fit_statistics(self, emb: torch.Tensor, pairs: torch.Tensor, gen: torch.Generator) -> None:
        import torch

        if pairs.shape[0] > _STATS_PAIRS:
            pairs = pairs[torch.randperm(pairs.shape[0], generator=gen)[:_STATS_PAIRS]]
        features = _pair_features(emb, pairs)
        std = features.std(dim=0, unbiased=False)
        # A dimension that never varied on the labelled pairs must not blow up later.
        floor = 0.1 * float(std.mean()) if float(std.mean()) > 0 else 1.0
        self._mean = features.mean(dim=0)
        self._scale = std.clamp_min(floor)

    def _logits(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """(M,) float64 logits of the network in eval mode, in batches."""
        import torch

        model = self._ensure_model(embeddings.shape[1])
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        idx = torch.from_numpy(np.ascontiguousarray(pairs, dtype=np.int64))
        out = np.empty(pairs.shape[0], dtype=np.float64)
        model.eval()
        with torch.inference_mode():
            for start in range(0, idx.shape[0], SCORE_BATCH):
                chunk = idx[start : start + SCORE_BATCH]
                z = model(self._standardise(_pair_features(emb, chunk)))[:, 0]
                out[start : start + chunk.shape[0]] = z.numpy()
        return out

    # -- the contract --------------------------------------------------------------------

    def fit(self, embeddings: np.ndarray, pairs: np.ndarray, labels: np.ndarray) -> None:
        """Train the classifier on the labelled pairs (see the class docstring)."""
        import torch

        keep = (labels == 0) | (labels == 1)
        pairs, labels = pairs[keep], labels[keep]
        model = self._ensure_model(embeddings.shape[1])
        self.fits += 1
        n_pos = int((labels == 1).sum())
        n_neg = int(labels.shape[0]) - n_pos
        if n_pos == 0 or n_neg == 0:
            self.fallback_reason = (
                f"fit saw {n_pos} similar and {n_neg} dissimilar pairs: the classifier was "
                "not trained this time, scores are close to arbitrary"
            )
            return
        self.fallback_reason = None
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        idx = torch.from_numpy(np.ascontiguousarray(pairs, dtype=np.int64))
        target = torch.from_numpy((labels == 1).astype(np.float32))
        # Class-balanced: each class contributes half of the loss.
        weight = torch.where(target > 0, 0.5 * len(target) / n_pos, 0.5 * len(target) / n_neg)

        # Seeded per fit: different shuffles each round, identical across runs.
        fit_seed = int(np.random.SeedSequence([self.seed, self.fits]).generate_state(1)[0])
        threads = torch.get_num_threads()
        # Minibatches of a few hundred pairs gain nothing from intra-op threads, and on a
        # busy machine spinning OpenMP workers made a 0.5 s fit take 10-15 s (measured).
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(fit_seed)
                gen = torch.Generator().manual_seed(fit_seed)
                self._fit_statistics(emb, idx, gen)
                self._train(model, emb, idx, target, weight, gen)
        finally:
            torch.set_num_threads(threads)
        model.eval()

    def _train(
        self,
        model: torch.nn.Module,
        emb: torch.Tensor,
        idx: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        gen: torch.Generator,
    ) -> None:
        """Adam on the weighted BCE: ``epochs`` passes, at most ``max_steps`` steps."""
        import torch

        optimiser = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        m = len(target)
        steps_left = self.max_steps
        model.train()
        for _ in range(self.epochs):
            order = torch.randperm(m, generator=gen)
            total, seen = 0.0, 0
            for start in range(0, m, self.batch_size):
                batch = order[start : start + self.batch_size]
                x = self._standardise(_pair_features(emb, idx[batch]))
                loss = (loss_fn(model(x)[:, 0], target[batch]) * weight[batch]).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
                seen += len(batch)
                steps_left -= 1
                if steps_left == 0:
                    break
            self.train_loss_ = total / seen
            if steps_left == 0:
                break

    def predict_proba(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """P(similar) of each pair.

        Args:
            embeddings: (N, D) float32 embeddings.
            pairs: (M, 2) int64 patch ids.

        Returns:
            (M,) float64 probabilities in [0, 1].
        """
        emb, prs = self._check_inputs(embeddings, pairs)
        z = self._logits(emb, prs)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), without overflow warnings

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Return (M,) float64 ``1 - |2p - 1|`` (1 at p = 0.5, 0 when certain)."""
        z = self._logits(embeddings, pairs)
        # 1 - |2 sigmoid(z) - 1| = 2 sigmoid(-|z|) = 2 / (1 + e^|z|): the same value, but it
        # keeps confident pairs apart instead of rounding them all to exactly 0.
        return 2.0 / (1.0 + np.exp(np.minimum(np.abs(z), 700.0)))
