"""The annotator contract's checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import AnnealError, PluginError
from anneal_geo.testing.core import _check
from anneal_geo.testing.report import ConformanceReport, _Checks, _expect, _same
from anneal_geo.testing.sample import _ANNOTATE_PAIRS, Sample, _all_pairs

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = ["check_annotator"]

#: The annotator checks, in the order they run.
_CHECKS = (
    "prepare",
    "annotate",
    "deterministic",
    "zero pairs",
    "one pair",
    "unlabelled pool",
)


def check_annotator(
    annotator: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check an annotator class (or instance) against the annotator contract.

    Checks, on a small labelled pool of real patches: the contract checks; ``prepare`` on the
    labelled pool; 40 pairs through ``checked_annotate`` (every answer 1, 0 or -1, at most one
    per pair, and all of them from a non-interactive annotator); the same answers from a
    second instance with the same seed; zero pairs and one pair; on an unlabelled pool, a
    ``needs_labels`` annotator refuses with an anneal-geo error (DataError, ConfigError)
    rather than crashing, and any other annotator answers. Interactive annotators (a person
    answers) skip the answering checks.

    Args and raises: as :func:`check_estimator`.
    """
    return _check("annotators", annotator, _annotator_checks, options, sample, _CHECKS)


def _annotator_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    from anneal_geo.data.pool import PatchPool

    pool = sample.pool
    rng = np.random.default_rng(7)
    everything = _all_pairs(len(pool))
    labels = pool.single_labels()
    same = np.flatnonzero(labels[everything[:, 0]] == labels[everything[:, 1]])
    other = np.setdiff1d(np.arange(everything.shape[0]), same)
    count = min(_ANNOTATE_PAIRS, everything.shape[0])
    n_same = min(count // 4, same.size)
    n_other = min(count - n_same, other.size)
    pick = np.concatenate(
        [rng.choice(same, n_same, replace=False), rng.choice(other, n_other, replace=False)]
    )
    pairs = everything[np.sort(pick)]

    def answer(ann: Any, prs: np.ndarray, on: PatchPool = pool) -> list[int]:
        ann.prepare(on)
        return list(ann.checked_annotate(prs.copy(), on))

    if getattr(cls, "interactive", False):
        for name in ("annotate", "deterministic", "zero pairs", "one pair", "unlabelled pool"):
            c.skip(name, "interactive annotator: a person answers")
        return

    with c.check("prepare", critical=True):
        make().prepare(pool)
    with c.check("annotate", critical=True):
        answers = answer(make(), pairs)
        timed = make()
        with c.timed(f"annotate {len(pairs)} pairs"):
            answer(timed, pairs)
        _expect(
            len(answers) == len(pairs),
            f"gave {len(answers)} answers to {len(pairs)} pairs; a non-interactive annotator "
            "must answer every pair (the engine would wait for the rest forever)",
        )
    with c.check("deterministic"):
        _same(np.array(answer(make(), pairs)), np.array(answers), "two instances, one seed")
    with c.check("zero pairs"):
        out = answer(make(), np.zeros((0, 2), dtype=np.int64))
        _expect(out == [], f"answered {len(out)} times to zero pairs")
    with c.check("one pair"):
        out = answer(make(), pairs[:1])
        _expect(len(out) == 1, f"gave {len(out)} answers to one pair")

    unlabelled = PatchPool(
        pool.patches, pool.bands, band_mean=pool.band_mean, band_std=pool.band_std
    )
    with c.check("unlabelled pool"):
        try:
            out = answer(make(), pairs, on=unlabelled)
        except PluginError:
            raise
        except AnnealError as exc:
            _expect(
                bool(getattr(cls, "needs_labels", False)),
                f"refused an unlabelled pool ({exc}) but declares needs_labels = False",
            )
        else:
            _expect(
                not getattr(cls, "needs_labels", False),
                "declares needs_labels = True but answered on a pool without labels",
            )
            _expect(len(out) == len(pairs), f"gave {len(out)} answers to {len(pairs)} pairs")
