"""The simulated oracle: answers pair questions from the pool's class labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from anneal_geo.annotators.base import Annotator
from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = ["OracleAnnotator"]

_NO_LABELS = (
    "the pool has no labels; the simulated oracle needs labelled patches (class folders or "
    "BigEarthNet JSON); use a human annotator (terminal/widget) for unlabelled pools"
)


class OracleAnnotator(Annotator):
    """Answers "similar?" from the labels, as a perfect (or noisy) expert would.

    Single-label pools: two patches are similar iff they share their class. Multi-label
    pools: similar iff the Jaccard index of their label sets is at least ``jaccard``
    (two patches without any label have Jaccard 0), or, with ``any_shared=True``, iff they
    share at least one label. With ``noise`` e > 0, each answer is flipped independently
    with probability e, to test robustness to annotation errors.

    The noise is reproducible: call number c of :meth:`annotate` on an oracle seeded s
    draws its flips from ``np.random.default_rng([s, c])``, so successive rounds get fresh
    flips and a rerun with the same seed gets the same ones. ``calls`` holds c; a resumed
    session that wants the original stream sets it to the number of rounds already asked.

    Args:
        seed: seed of the noise.
        noise: flip probability, in [0, 0.5] (0.5 is pure guessing; more would be an
            adversary, not noise).
        jaccard: multi-label similarity threshold, in (0, 1].
        any_shared: multi-label: similar iff at least one label is shared (ignores jaccard).
    """

    interactive: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        seed: int = 0,
        noise: float = 0.0,
        jaccard: float = 0.5,
        any_shared: bool = False,
        **options: Any,
    ) -> None:
        if options:
            raise ConfigError(
                f"oracle annotator: unknown option(s) {', '.join(sorted(options))}; "
                "known: seed, noise, jaccard, any_shared"
            )
        super().__init__(seed=seed)
        noise_value = _as_float(noise, "noise")
        if not 0.0 <= noise_value <= 0.5:
            raise ConfigError(
                f"oracle annotator: noise={noise!r} must lie in [0, 0.5] "
                "(the probability of flipping an answer; 0 = a perfect expert)"
            )
        jaccard_value = _as_float(jaccard, "jaccard")
        if not 0.0 < jaccard_value <= 1.0:
            raise ConfigError(
                f"oracle annotator: jaccard={jaccard!r} must lie in (0, 1] (the label-set "
                "overlap from which two multi-label patches count as similar; default 0.5)"
            )
        if not isinstance(any_shared, (bool, np.bool_)):
            raise ConfigError(f"oracle annotator: any_shared={any_shared!r} must be true or false")
        self.noise = noise_value
        self.jaccard = jaccard_value
        self.any_shared = bool(any_shared)
        self.calls = 0

    # -- the contract ----------------------------------------------------------------

    def prepare(self, pool: PatchPool) -> None:
        """Check that the pool has labels with at least two classes in use.

        Raises:
            DataError: the pool is unlabelled, or all its patches carry one and the same
                class (every answer would be "similar", which teaches nothing).
        """
        hot = _label_matrix(pool)
        used = np.flatnonzero(hot.any(axis=0))
        if used.size < 2:
            names = list(pool.class_names or [])
            name = f" ('{names[used[0]]}')" if used.size == 1 and used[0] < len(names) else ""
            raise DataError(
                f"the pool's labels use only {used.size} class{name}: every pair would be "
                "answered the same, so the oracle could teach nothing about what tells classes "
                "apart; add patches of at least one other class"
            )

    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterator[int]:
        """Answer every pair from the labels (all at once), then yield the answers one by one.

        Args:
            pairs: (M, 2) int64 patch ids.
            pool: the labelled pool the ids refer to.

        Returns:
            an iterator of M answers, 1 (similar) or 0 (dissimilar); the oracle never skips.
        """
        answers = self.answers(pairs, pool)
        return (int(answer) for answer in answers)

    # -- vectorised core ---------------------------------------------------------------

    def answers(self, pairs: np.ndarray, pool: PatchPool) -> np.ndarray:
        """The oracle's answers to all pairs as one (M,) int8 array (counts as one call)."""
        hot = _label_matrix(pool)
        prs = np.asarray(pairs)
        if prs.size and prs.dtype.kind not in "iu":
            raise DataError(f"pair ids must be integers, got dtype {prs.dtype}")
        prs = prs.astype(np.int64).reshape(-1, 2)
        if prs.size and (prs.min() < 0 or prs.max() >= hot.shape[0]):
            raise DataError(
                f"pair ids must lie in 0..{hot.shape[0] - 1} (the pool's {hot.shape[0]} patches)"
            )
        similar = self.similar(hot[prs[:, 0]], hot[prs[:, 1]], multilabel=bool(pool.multilabel))
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        # Draw one flip per pair even when noise is 0, so the stream of later calls does not
        # depend on the noise level.
        flips = rng.random(prs.shape[0]) < self.noise
        return (similar ^ flips).astype(np.int8)

    def similar(self, left: np.ndarray, right: np.ndarray, *, multilabel: bool) -> np.ndarray:
        """The noise-free rule on two (M, L) multi-hot label matrices: (M,) bool."""
        if not multilabel:
            # Exactly one class per row: same class iff the rows share their True entry.
            return (left & right).any(axis=1)
        shared = (left & right).sum(axis=1)
        if self.any_shared:
            return shared > 0
        union = (left | right).sum(axis=1)
        # Compare shared >= jaccard * union instead of dividing: no 0/0 for two empty label
        # sets (Jaccard 0 there), and no rounding of e.g. 1/2 against 0.5.
        return (shared > 0) & (shared >= self.jaccard * union - 1e-9)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"oracle annotator: {name}={value!r} must be a number")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"oracle annotator: {name}={value!r} must be a number") from None
    if not np.isfinite(result):
        raise ConfigError(f"oracle annotator: {name}={value!r} must be a finite number")
    return result


def _label_matrix(pool: PatchPool) -> np.ndarray:
    """The pool's labels as an (N, L) bool matrix, checked against the pool's size."""
    if pool.labels is None:
        raise DataError(_NO_LABELS)
    hot = np.asarray(pool.labels)
    n = len(pool)
    if hot.ndim != 2 or hot.shape[0] != n:
        raise DataError(
            f"the pool's labels have shape {hot.shape} for {n} patches; expected (N, L) "
            "multi-hot; rebuild the pool"
        )
    if hot.dtype != np.bool_:
        hot = hot.astype(bool)
    if not pool.multilabel:
        per_row = hot.sum(axis=1)
        if np.any(per_row != 1):
            bad = int(np.count_nonzero(per_row != 1))
            raise DataError(
                f"the pool is single-label but {bad} patch(es) do not have exactly one class; "
                "rebuild the pool, or mark it multi-label"
            )
    return hot
