"""``committee``: query by committee on the labelled pairs (an anneal-geo estimator plugin).

Each round, ``members`` copies of a small model are fitted on class-stratified bootstrap
resamples of the labelled pairs (queried and implied by transitivity). A pair is uncertain
when the members disagree about it: the entropy of the share of members voting "similar".
Where the labels pin the similarity boundary down, the members agree and few pairs are
uncertain; where they do not, the disagreement band is wide. MGUE uses one threshold and
cannot tell the two situations apart.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from anneal_geo.errors import ConfigError
from anneal_geo.estimators.base import Estimator
from anneal_geo.estimators.mgue import balanced_threshold, pair_distances

__all__ = ["MEMBERS", "CommitteeEstimator", "vote_entropy"]

#: The kinds of committee member.
MEMBERS = ("threshold", "logistic", "tree")
_DISAGREEMENTS = ("vote_entropy", "variance")
#: Pairs whose features are built at a time when scoring (bounds the temporaries).
_BLOCK = 16_384


def vote_entropy(votes: np.ndarray) -> np.ndarray:
    """Binary entropy (nats) of the share of members voting "similar".

    Args:
        votes: (M, B) bool, member b's vote on pair m.

    Returns:
        (M,) float64 in [0, ln 2]: 0 when all agree, ln 2 when they split evenly.
    """
    p = votes.mean(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    return np.nan_to_num(h, nan=0.0)


def _entropy_gap(members: int) -> float:
    """Half the smallest gap between two distinct vote-entropy levels of ``members`` votes:
    a tie-break term below it never reorders pairs of different entropy."""
    p = np.arange(members + 1) / members
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.nan_to_num(-(p * np.log(p) + (1 - p) * np.log(1 - p)), nan=0.0)
    distinct = np.unique(np.round(levels, 12))
    return 0.5 * float(np.diff(distinct).min()) if distinct.size > 1 else 0.5


def _pair_features(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``[|f_i - f_j|, f_i * f_j]``: symmetric in the pair order."""
    a = embeddings[pairs[:, 0]]
    b = embeddings[pairs[:, 1]]
    return np.concatenate([np.abs(a - b), a * b], axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class CommitteeEstimator(Estimator):
    """Query by committee: disagreement of models fitted on bootstrap resamples of the labels.

    Members (``member=``):

    - ``"threshold"`` (default): MGUE's balanced distance threshold tau_b, fitted on each
      resample; member b votes "similar" iff d_ij < tau_b. Fast and robust.
    - ``"logistic"``: an L2-regularised, class-balanced logistic regression on the pair
      feature ``[|f_i - f_j|, f_i * f_j]`` (standardised), fitted by gradient descent.
    - ``"tree"``: a depth-limited decision tree on the same feature (needs scikit-learn:
      ``pip install 'anneal-geo-committee[trees]'``).

    Uncertainty (``disagreement=``):

    - ``"vote_entropy"`` (default): entropy of the share of members voting "similar". Pairs
      with the same entropy (and the many on which all members agree) are ordered by how
      close the members' mean margin is to the boundary, through a term smaller than any
      gap between entropy levels, so the engine's short-list is never filled at random.
    - ``"variance"``: variance of the members' P(similar) (logistic/tree probabilities;
      threshold members use ``sigmoid((tau_b - d) / s)`` with s the spread of the taus).

    Resamples are class-stratified (each class resampled with replacement to its own size,
    at most ``max_pairs`` in all), so every member sees both classes. Everything random is
    drawn from ``np.random.default_rng([seed, fit count])``: the same seed repeats exactly.

    Fallbacks (recorded in :attr:`fallback_reason`): labels of one class only: threshold
    members at the nearest cut that keeps the resample correct, whatever ``member`` is; no
    labelled pairs (or before the first fit): uncertainty ``-|d - median d|`` over the pairs
    being scored, as MGUE does.

    Attributes:
        thresholds_: (B,) the members' taus (threshold members), else None.
        fallback_reason: why a fallback was used, or None.

    Args:
        seed: seed of the resampling and of the members.
        members: committee size B (>= 2).
        member: ``"threshold"``, ``"logistic"`` or ``"tree"``.
        disagreement: ``"vote_entropy"`` or ``"variance"``.
        max_pairs: cap on the labelled pairs in one resample.
        steps: gradient steps of a logistic member.
        l2: L2 penalty of a logistic member.
        depth: maximum depth of a tree member.
        **options: passed on to :class:`~anneal_geo.estimators.base.Estimator`.

    Raises:
        ConfigError: a setting is out of range.
    """

    needs_labels: ClassVar[bool] = True
    symmetric: ClassVar[bool] = True
    contract_version: ClassVar[int] = 1

    def __init__(
        self,
        seed: int = 0,
        members: int = 15,
        member: str = "threshold",
        disagreement: str = "vote_entropy",
        max_pairs: int = 5000,
        steps: int = 150,
        l2: float = 1e-3,
        depth: int = 4,
        **options: Any,
    ) -> None:
        if int(members) < 2:
            raise ConfigError(f"committee estimator: members must be >= 2, got {members!r}")
        if member not in MEMBERS:
            raise ConfigError(
                f"committee estimator: member must be one of {', '.join(MEMBERS)}, got {member!r}"
            )
        if disagreement not in _DISAGREEMENTS:
            raise ConfigError(
                "committee estimator: disagreement must be one of "
                f"{', '.join(_DISAGREEMENTS)}, got {disagreement!r}"
            )
        checks = {
            "max_pairs": (max_pairs, int(max_pairs) >= 2, ">= 2"),
            "steps": (steps, int(steps) >= 1, ">= 1"),
            "l2": (l2, float(l2) >= 0.0, ">= 0"),
            "depth": (depth, int(depth) >= 1, ">= 1"),
        }
        for name, (value, ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"committee estimator: {name} must be {rule}, got {value!r}")
        if member == "tree":
            _require_sklearn()
        super().__init__(
            seed,
            members=int(members),
            member=member,
            disagreement=disagreement,
            max_pairs=int(max_pairs),
            steps=int(steps),
            l2=float(l2),
            depth=int(depth),
            **options,
        )
        self.members = int(members)
        self.member = member
        self.disagreement = disagreement
        self.max_pairs = int(max_pairs)
        self.steps = int(steps)
        self.l2 = float(l2)
        self.depth = int(depth)
        self.fits = 0
        self.fallback_reason: str | None = None
        self.thresholds_: np.ndarray | None = None
        # Fitted state of the learned members: feature mean/scale, weights, biases, trees.
        self._kind = "none"
        self._mean: np.ndarray | None = None
        self._scale: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self._bias: np.ndarray | None = None
        self._trees: list[Any] = []
        self._gap = _entropy_gap(self.members)

    # -- fitting ---------------------------------------------------------------------------

    def _resamples(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, S) row indices: class-stratified bootstrap resamples of the labelled pairs.

        Each class is resampled with replacement to its own size, so every member sees both
        classes when the labels hold both.
        """
        groups = [g for g in (np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)) if g.size]
        draws = [g[rng.integers(0, g.size, size=(self.members, g.size))] for g in groups]
        return np.concatenate(draws, axis=1)

    def fit(self, embeddings: np.ndarray, pairs: np.ndarray, labels: np.ndarray) -> None:
        """Fit the committee on resamples of the labelled pairs (see the class docstring)."""
        keep = (labels == 0) | (labels == 1)
        pairs, labels = pairs[keep], labels[keep]
        self.fits += 1
        self.fallback_reason = None
        self.thresholds_ = None
        if labels.size == 0:
            self._kind = "none"
            self.fallback_reason = "no labelled pairs: uncertainty is -|d - median d|"
            return
        rng = np.random.default_rng([self.seed, self.fits])
        if labels.size > self.max_pairs:  # transitivity can imply very many pairs
            subset = np.sort(rng.choice(labels.size, self.max_pairs, replace=False))
            pairs, labels = pairs[subset], labels[subset]
        rows = self._resamples(labels, rng)
        two_classes = 0 < int(labels.sum()) < labels.size
        if self.member == "threshold" or not two_classes:
            if not two_classes and self.member != "threshold":
                self.fallback_reason = (
                    f"labels of one class only: threshold members instead of {self.member}"
                )
            self._fit_thresholds(pair_distances(embeddings, pairs), labels, rows)
            return
        # How often each labelled pair occurs in each resample: (B, M) weights, so the
        # learned members train on the labelled rows once, weighted, not on B copies.
        m = labels.size
        offsets = (rows + m * np.arange(self.members)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=self.members * m).reshape(self.members, m)
        features = _pair_features(embeddings, pairs)
        if self.member == "logistic":
            self._fit_logistic(features, labels, counts.astype(np.float64))
        else:
            self._fit_trees(features, labels, counts, rng)

    def _fit_thresholds(self, distances: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        taus = np.empty(self.members, dtype=np.float64)
        for b in range(self.members):  # one exact O(S log S) sweep per member
            d, similar = distances[rows[b]], labels[rows[b]] == 1
            if similar.all():
                taus[b] = float(np.nextafter(d.max(), np.inf))
            elif not similar.any():
                taus[b] = float(d.min())
            else:
                taus[b] = balanced_threshold(d, similar)[0]
        self.thresholds_ = taus
        self._kind = "threshold"

    def _fit_logistic(self, features: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> None:
        """All members at once by gradient descent on the class-balanced, L2-penalised
        logistic loss, each weighting the labelled rows by its bootstrap counts."""
        self._mean = features.mean(axis=0)
        spread = features.std(axis=0)
        # Dimensions that never vary on the labelled pairs must not blow up when scoring.
        self._scale = np.maximum(spread, 0.1 * float(spread.mean()) or 1.0)
        x = (features - self._mean) / self._scale
        y = (labels == 1).astype(np.float64)
        # Class-balanced: in every member each class weighs one half of the loss.
        pos = counts * y[None, :]
        neg = counts - pos
        sample_weight = 0.5 * pos / np.maximum(pos.sum(axis=1, keepdims=True), 1.0)
        sample_weight += 0.5 * neg / np.maximum(neg.sum(axis=1, keepdims=True), 1.0)
        # Step size 1 / L from the largest eigenvalue of the (averaged) weighted Gram matrix
        # (a few power iterations): the loss's curvature is at most L / 4 of it.
        average = sample_weight.mean(axis=0)
        v = np.ones(x.shape[1]) / math.sqrt(x.shape[1])
        for _ in range(20):
            v = x.T @ (average * (x @ v))
            v /= max(float(np.linalg.norm(v)), 1e-12)
        curvature = float(v @ (x.T @ (average * (x @ v))))
        lr = 1.0 / (0.5 * curvature + self.l2)  # 2x the bound: resample weights vary
        weights = np.zeros((self.members, x.shape[1]))
        bias = np.zeros(self.members)
        for _ in range(self.steps):
            residual = (_sigmoid(x @ weights.T + bias) - y[:, None]) * sample_weight.T  # (M, B)
            weights -= lr * (residual.T @ x + self.l2 * weights)
            bias -= lr * residual.sum(axis=0)
        self._weights, self._bias = weights, bias
        self._kind = "logistic"

    def _fit_trees(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        counts: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        tree_cls = _require_sklearn()
        self._trees = []
        for b in range(self.members):
            tree = tree_cls(
                max_depth=self.depth,
                class_weight="balanced",
                random_state=int(rng.integers(0, 2**31 - 1)),
            )
            tree.fit(features, labels == 1, sample_weight=counts[b])
            self._trees.append(tree)
        self._kind = "tree"

    # -- scoring ---------------------------------------------------------------------------

    def margins(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """(M, B) each member's margin for "similar" (> 0: votes similar).

        Threshold members: ``tau_b - d``; logistic members: the logit; trees: the logit of
        the leaf's class frequency, clipped to +-10.
        """
        if self._kind == "threshold":
            assert self.thresholds_ is not None
            return self.thresholds_[None, :] - pair_distances(embeddings, pairs)[:, None]
        out = np.empty((pairs.shape[0], self.members), dtype=np.float64)
        for start in range(0, pairs.shape[0], _BLOCK):
            block = _pair_features(embeddings, pairs[start : start + _BLOCK])
            if self._kind == "logistic":
                assert self._mean is not None and self._scale is not None
                assert self._weights is not None and self._bias is not None
                x = (block - self._mean) / self._scale
                out[start : start + len(block)] = x @ self._weights.T + self._bias
            else:
                probs = np.stack([_similar_proba(tree, block) for tree in self._trees], axis=1)
                probs = np.clip(probs, 1 / (1 + math.exp(10)), 1 / (1 + math.exp(-10)))
                out[start : start + len(block)] = np.log(probs) - np.log1p(-probs)
        return out

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Return (M,) float64 disagreement (higher = more uncertain)."""
        if pairs.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        if self._kind == "none":
            d = pair_distances(embeddings, pairs)
            return -np.abs(d - np.median(d))
        z = self.margins(embeddings, pairs)
        # Tie-break in [0, gap): pairs nearer the committee's mean boundary rank higher.
        mean_margin = np.abs(z.mean(axis=1))
        closeness = self._gap * (1.0 - mean_margin / (mean_margin + self._margin_scale()))
        if self.disagreement == "vote_entropy":
            return vote_entropy(z > 0) + closeness
        return self._probabilities(z).var(axis=1) + 1e-3 * closeness

    def _margin_scale(self) -> float:
        if self._kind == "threshold":
            assert self.thresholds_ is not None
            return max(float(self.thresholds_.std()), 1e-6)
        return 1.0  # logits

    def _probabilities(self, z: np.ndarray) -> np.ndarray:
        return _sigmoid(z / self._margin_scale() if self._kind == "threshold" else z)


def _similar_proba(tree: Any, features: np.ndarray) -> np.ndarray:
    """P(similar) from a fitted tree; a tree that only saw one class answers with it."""
    proba = tree.predict_proba(features)
    classes = list(tree.classes_)
    if True in classes:
        return np.asarray(proba[:, classes.index(True)], dtype=np.float64)
    return np.zeros(features.shape[0], dtype=np.float64)


def _require_sklearn() -> Any:
    try:
        from sklearn.tree import DecisionTreeClassifier
    except ImportError:
        raise ConfigError(
            "committee estimator: member='tree' needs scikit-learn; install it with "
            "pip install 'anneal-geo-committee[trees]'"
        ) from None
    return DecisionTreeClassifier
