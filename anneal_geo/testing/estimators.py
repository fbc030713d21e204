"""The estimator contract's checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from anneal_geo.testing.core import _check, global_seeds, global_state
from anneal_geo.testing.report import ConformanceReport, _Checks, _expect, _same
from anneal_geo.testing.sample import (
    _CANDIDATES,
    _DATA_SEED,
    _LABELLED_DISSIMILAR,
    _LABELLED_SIMILAR,
    Sample,
)

__all__ = ["check_estimator"]

#: The estimator checks, in the order they run.
_CHECKS = (
    "fit and score",
    "inputs unchanged",
    "deterministic",
    "only its own seed",
    "symmetric",
    "score zero pairs",
    "score one pair",
    "fit on zero pairs",
    "fit on one pair",
    "fit on one class",
)


@dataclass(frozen=True)
class _EstimatorData:
    first_pairs: np.ndarray
    first_labels: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    candidates: np.ndarray


def _estimator_data(sample: Sample) -> _EstimatorData:
    """Labelled pairs of two rounds (similar and dissimilar) and candidate pairs to score."""
    pairs, labels = sample.labelled_pairs(_LABELLED_SIMILAR, _LABELLED_DISSIMILAR, seed=_DATA_SEED)
    half = labels.size // 2
    return _EstimatorData(
        first_pairs=pairs[:half],
        first_labels=labels[:half],
        pairs=pairs,
        labels=labels,
        candidates=sample.candidate_pairs(_CANDIDATES, exclude=pairs, seed=_DATA_SEED),
    )


def check_estimator(
    estimator: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check an estimator class (or instance) against the estimator contract.

    Checks, on the sample's embeddings: the contract checks (subclass, methods implemented,
    ``fit``/``score`` signatures, ``cls(seed=0)``, capability flags, docstring, contract
    version); fit on labelled pairs of two rounds and score 3,000 pairs through
    ``checked_fit``/``checked_score`` (shape (M,), floating, finite); inputs left unchanged;
    the same scores from a second instance with the same seed; the same scores whatever the
    global numpy, Python and torch random state (only the plugin's seed counts); the same
    score for (i, j) and (j, i) when ``symmetric``; zero pairs and one pair to score; a fit on
    zero pairs, on one pair and on pairs of one class only (all of which the engine can
    produce) followed by valid scores. The report notes how long a fit and a score took.

    Args:
        estimator: an Estimator subclass (instantiated as ``cls(seed=0, **options)``) or an
            instance (deep-copied for each check).
        options: constructor options for a class.
        sample: the data (default: :func:`load_sample`).

    Returns:
        the report.

    Raises:
        ConformanceError: a check failed; the message names the plugin and every failed check.
    """
    return _check("estimators", estimator, _estimator_checks, options, sample, _CHECKS)


def _estimator_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    data = _estimator_data(sample)
    emb = sample.embeddings

    def rounds(est: Any, score_pairs: np.ndarray) -> np.ndarray:
        # Two rounds as the engine runs them: fit, score, fit on more pairs, score.
        est.checked_fit(emb.copy(), data.first_pairs.copy(), data.first_labels.copy())
        est.checked_score(emb.copy(), data.candidates.copy())
        est.checked_fit(emb.copy(), data.pairs.copy(), data.labels.copy())
        return np.asarray(est.checked_score(emb.copy(), score_pairs.copy()))

    with c.check("fit and score", critical=True):
        scores = rounds(make(), data.candidates)
        _expect(scores.shape == (data.candidates.shape[0],), f"got shape {scores.shape}")
        timed = make()
        with c.timed(f"fit on {data.labels.size} pairs"):
            timed.checked_fit(emb.copy(), data.pairs.copy(), data.labels.copy())
        with c.timed(f"score {data.candidates.shape[0]} pairs"):
            timed.checked_score(emb.copy(), data.candidates.copy())

    with c.check("inputs unchanged"):
        est = make()
        inputs = (emb.copy(), data.pairs.copy(), data.labels.copy(), data.candidates.copy())
        est.checked_fit(inputs[0], inputs[1], inputs[2])
        est.checked_score(inputs[0], inputs[3])
        for given, original, what in zip(
            inputs,
            (emb, data.pairs, data.labels, data.candidates),
            ("embeddings", "labelled pairs", "labels", "pairs to score"),
            strict=True,
        ):
            _expect(np.array_equal(given, original), f"fit() or score() modified the {what}")

    deterministic = False
    with c.check("deterministic"):
        _same(rounds(make(), data.candidates), scores, "two instances with the same seed")
        deterministic = True

    if not deterministic:
        c.skip("only its own seed", "needs the 'deterministic' check to pass")
    else:
        with c.check("only its own seed"):
            results = []
            for seed in (1, 2):
                with global_seeds(seed):
                    before = global_state()
                    results.append(rounds(make(), data.candidates))
                    _expect(
                        global_state() == before,
                        "fit() or score() changed numpy's or Python's global random state "
                        "(np.random.seed, np.random.*, random.* ...); draw from a generator "
                        "of your own seeded with the plugin's seed",
                    )
            _same(
                results[0],
                results[1],
                "different global numpy/random/torch seeds (draw from a generator seeded "
                "with the plugin's seed)",
            )

    if not getattr(cls, "symmetric", True):
        c.skip("symmetric", "the estimator declares symmetric = False")
    elif not deterministic:
        c.skip("symmetric", "needs the 'deterministic' check to pass")
    else:
        with c.check("symmetric"):
            reverse = rounds(make(), data.candidates[:, ::-1])
            _same(reverse, scores, "score(j, i) against score(i, j) (symmetric = True)")

    empty_pairs = np.zeros((0, 2), dtype=np.int64)
    empty_labels = np.zeros(0, dtype=np.int8)
    with c.check("score zero pairs"):
        est = make()
        est.checked_fit(emb.copy(), data.pairs.copy(), data.labels.copy())
        out = est.checked_score(emb.copy(), empty_pairs)
        _expect(out.shape == (0,), f"got shape {out.shape} for zero pairs")
    with c.check("score one pair"):
        est = make()
        est.checked_fit(emb.copy(), data.pairs.copy(), data.labels.copy())
        out = est.checked_score(emb.copy(), data.candidates[:1].copy())
        _expect(out.shape == (1,), f"got shape {out.shape} for one pair")

    def fit_then_score(pairs: np.ndarray, labels: np.ndarray) -> None:
        est = make()
        est.checked_fit(emb.copy(), pairs.copy(), labels.copy())
        out = est.checked_score(emb.copy(), data.candidates.copy())
        _expect(out.shape == (data.candidates.shape[0],), f"got shape {out.shape}")

    with c.check("fit on zero pairs"):
        fit_then_score(empty_pairs, empty_labels)
    with c.check("fit on one pair"):
        fit_then_score(data.pairs[:1], data.labels[:1])
    with c.check("fit on one class"):
        for value in (0, 1):
            keep = data.labels == value
            fit_then_score(data.pairs[keep], data.labels[keep])
