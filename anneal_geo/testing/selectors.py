"""The selector contract's checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from anneal_geo.testing.core import _check, global_seeds
from anneal_geo.testing.report import ConformanceReport, _Checks, _expect, _same
from anneal_geo.testing.sample import _DATA_SEED, _SHORTLIST, Sample

__all__ = ["check_selector"]

#: The selector checks, in the order they run.
_CHECKS = (
    "select",
    "inputs unchanged",
    "deterministic",
    "only the given generator",
    "k == M",
    "k == 1",
    "one row",
    "identical descriptors",
    "equal uncertainty",
)


def check_selector(
    selector: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check a selector class (or instance) against the selector contract.

    Checks, on a short-list of 200 real pair descriptors: the contract checks; ``k`` of M
    through ``checked_select`` (k distinct integer indices in [0, M)); inputs left unchanged;
    the same choice from a second instance given a generator with the same seed; no use of
    numpy's or Python's global random state; ``k == M``, ``k == 1`` and a one-row short-list;
    identical descriptors and equal uncertainties (ties) still giving k distinct rows.

    Args and raises: as :func:`check_estimator`.
    """
    return _check("selectors", selector, _selector_checks, options, sample, _CHECKS)


def _selector_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    _, descriptors, uncertainty = sample.shortlist(_SHORTLIST, seed=_DATA_SEED)
    m = descriptors.shape[0]
    k = m // 10

    def pick(sel: Any, desc: np.ndarray, unc: np.ndarray, count: int, seed: int = 7) -> Any:
        return sel.checked_select(desc.copy(), unc.copy(), count, np.random.default_rng(seed))

    with c.check("select", critical=True):
        chosen = pick(make(), descriptors, uncertainty, k)
        timed = make()
        with c.timed(f"select {k} of {m}"):
            pick(timed, descriptors, uncertainty, k)

    with c.check("inputs unchanged"):
        desc, unc = descriptors.copy(), uncertainty.copy()
        make().checked_select(desc, unc, k, np.random.default_rng(7))
        _expect(np.array_equal(desc, descriptors), "select() modified the descriptors")
        _expect(np.array_equal(unc, uncertainty), "select() modified the uncertainty")

    with c.check("deterministic"):
        _same(pick(make(), descriptors, uncertainty, k), chosen, "two generators with one seed")

    with c.check("only the given generator"):
        results = []
        for seed in (1, 2):
            with global_seeds(seed):  # restored afterwards
                results.append(pick(make(), descriptors, uncertainty, k))
        _same(results[0], results[1], "different global numpy/random seeds (use rng only)")

    with c.check("k == M"):
        out = pick(make(), descriptors[:40], uncertainty[:40], 40)
        _expect(np.array_equal(np.sort(out), np.arange(40)), "did not return every row")
    with c.check("k == 1"):
        pick(make(), descriptors, uncertainty, 1)
    with c.check("one row"):
        pick(make(), descriptors[:1], uncertainty[:1], 1)
    with c.check("identical descriptors"):
        pick(make(), np.repeat(descriptors[:1], 30, axis=0), uncertainty[:30], 10)
    with c.check("equal uncertainty"):
        pick(make(), descriptors[:50], np.zeros(50), 10)
