"""The conformance kit: check that a plugin keeps its contract, on real Sentinel-2 data.

Plugin authors run it in their own tests, on a class::

    from anneal_geo.testing import check_estimator

    def test_my_estimator_keeps_the_contract():
        check_estimator(MyEstimator)

or on every plugin their installed distribution declares, with one parametrised test::

    import pytest
    from anneal_geo.testing import check_plugin, plugin_cases

    @pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="my-dist"))
    def test_conformance(group, name):
        check_plugin(group, name)

Each ``check_*`` function runs all of its checks, then raises :class:`ConformanceError` (an
``AssertionError``, so pytest reports a plain test failure) whose first line names the plugin
and the failed checks, one further line per failure; on success it returns a
:class:`ConformanceReport` listing what passed and what was skipped.

The data is real: 283 EuroSAT-MS patches (Sentinel-2 L1C, 13 bands; Helber et al., MIT
licence) shipped inside the package as ``anneal_geo/testing_data/eurosat_ms_sample.npz``
(about 160 KB, see the README there): per-band statistics of every patch, from which the
embeddings the estimators and selectors see are computed, and 30 labelled 16 x 16 crops (3 per
class) that form the small :class:`~anneal_geo.data.pool.PatchPool` the backbones and
annotators see. So the kit behaves the same in a third-party package's CI as in ours, without
the repository's ``sample_tiles/`` and without reading a raster. ``load_sample(folder)``
builds the same kind of sample from any class-per-folder archive instead, and
:func:`write_sample_file` regenerates the shipped file from ``sample_tiles/eurosat_ms``.

Importing this module imports neither torch nor faiss nor rasterio; the backbone checks import
torch when they run.
"""

from __future__ import annotations

import copy
import inspect
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo import plugins
from anneal_geo.errors import AnnealError, DataError, PluginError

if TYPE_CHECKING:
    import torch

    from anneal_geo.data.pool import PatchPool

__all__ = [
    "CONTRACT_VERSIONS",
    "SAMPLE_FILE",
    "ConformanceError",
    "ConformanceReport",
    "Sample",
    "check_annotator",
    "check_backbone",
    "check_estimator",
    "check_plugin",
    "check_selector",
    "contract_version",
    "load_sample",
    "plugin_cases",
    "run_sample_session",
    "sample_arrays",
    "write_sample_file",
]

#: The shipped sample (see ``anneal_geo/testing_data/README.md``).
SAMPLE_FILE = Path(__file__).resolve().parent / "testing_data" / "eurosat_ms_sample.npz"

#: Contract version of each group, used while a base class declares no ``contract_version``.
CONTRACT_VERSIONS: dict[str, int] = {
    "estimators": 1,
    "selectors": 1,
    "backbones": 1,
    "annotators": 1,
}

#: The methods of each contract whose signatures must match the base class.
_METHODS: dict[str, tuple[str, ...]] = {
    "estimators": ("fit", "score"),
    "selectors": ("select",),
    "backbones": ("build",),
    "annotators": ("prepare", "annotate"),
}

#: Capability attributes of each contract; each must be a bool.
_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "estimators": ("needs_labels", "symmetric"),
    "selectors": (),
    "backbones": ("trainable",),
    "annotators": ("interactive", "needs_labels"),
}

# Sample layout: crops per class and crop size of the small pool.
_PER_CLASS = 3
_CROP = 16
# Pairs the estimator checks use: labelled (similar / dissimilar) and to score.
_LABELLED_SIMILAR = 120
_LABELLED_DISSIMILAR = 280
_CANDIDATES = 3000
# Rows of the selector's short-list and pairs asked of an annotator.
_SHORTLIST = 200
_ANNOTATE_PAIRS = 40
# Relative tolerance of "the same result twice" (bit-identical is expected on one machine;
# this only forgives reductions whose order a thread pool may change).
_RTOL = 1e-5


class ConformanceError(AssertionError):
    """A plugin failed conformance checks; the first line names it and the failed checks."""


@dataclass
class ConformanceReport:
    """What :func:`check_estimator` and friends found for one plugin.

    Attributes:
        plugin: how the plugin is named (its registry origin, or ``module:Class``).
        group: ``estimators``, ``selectors``, ``backbones`` or ``annotators``.
        passed: the checks that passed, in the order they ran.
        skipped: check name -> why it did not apply.
        notes: check name -> something worth knowing that is not a failure (for example a
            band subset the backbone refused with a clear error).
    """

    plugin: str
    group: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.plugin}: {len(self.passed)} conformance checks passed"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note {name}: {text}" for name, text in self.notes.items()]
        return "\n".join(lines)


# -- the sample ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The real data the checks run on.

    Attributes:
        embeddings: (N, D) float32, L2-normalised, read-only: standardised log per-band mean
            and standard deviation of each patch (N = 283, D = 26 for the shipped sample).
        labels: (N,) int64 class index of each patch.
        class_names: the class of each label index.
        sources: per patch, its file relative to the archive folder.
        pool: a small labelled pool of real patches (centre crops, native units).
        origin: where the sample came from, for messages.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    pool: PatchPool
    origin: str

    def labelled_pairs(
        self, similar: int = 120, dissimilar: int = 280, *, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labelled pairs as an annotator would give them, in random order.

        Args:
            similar: pairs of the same class (fewer if the sample has fewer).
            dissimilar: pairs of different classes.
            seed: seed of the draw.

        Returns:
            ((M, 2) int64 pairs with i < j, (M,) int8 labels: 1 similar, 0 dissimilar).
        """
        rng = np.random.default_rng(seed)
        everything = _all_pairs(self.embeddings.shape[0])
        same = self.labels[everything[:, 0]] == self.labels[everything[:, 1]]
        pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
        picked = rng.permutation(
            np.concatenate(
                [
                    rng.choice(pos, min(similar, pos.size), replace=False),
                    rng.choice(neg, min(dissimilar, neg.size), replace=False),
                ]
            )
        )
        return everything[picked], same[picked].astype(np.int8)

    def candidate_pairs(
        self, count: int = 3000, *, exclude: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """Distinct random pairs (sorted, i < j) to score, none of them in ``exclude``."""
        n = self.embeddings.shape[0]
        everything = _all_pairs(n)
        keys = everything[:, 0] * n + everything[:, 1]
        if exclude is not None and len(exclude):
            ex = np.sort(np.asarray(exclude, dtype=np.int64).reshape(-1, 2), axis=1)
            keys = np.setdiff1d(keys, ex[:, 0] * n + ex[:, 1])
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(keys, min(count, keys.size), replace=False))
        return np.stack([chosen // n, chosen % n], axis=1)

    def shortlist(
        self, size: int = 200, *, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A short-list as the engine hands it to a selector.

        The ``size`` candidate pairs nearest a distance threshold fitted on labelled pairs
        (the midpoint of the two classes' mean distances), like MGUE's.

        Returns:
            ((size, 2) pairs, (size, 2D) float32 descriptors ``[f_i + f_j, |f_i - f_j|]``,
            (size,) float64 uncertainty ``-|d - tau|``).
        """
        from anneal_geo.selectors.descriptors import pair_descriptors

        emb = self.embeddings
        pairs, labels = self.labelled_pairs(seed=seed)
        distance = np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
        tau = 0.5 * (distance[labels == 1].mean() + distance[labels == 0].mean())
        cand = self.candidate_pairs(exclude=pairs, seed=seed)
        u = -np.abs(np.linalg.norm(emb[cand[:, 0]] - emb[cand[:, 1]], axis=1) - tau)
        keep = np.sort(np.argsort(-u, kind="stable")[:size])
        return cand[keep], pair_descriptors(emb, cand[keep]), u[keep].astype(np.float64)


def sample_arrays(
    pool: PatchPool, *, per_class: int = _PER_CLASS, crop: int = _CROP
) -> dict[str, np.ndarray]:
    """The arrays of a sample, computed from a single-label pool of real patches.

    Args:
        pool: a labelled single-label pool, e.g. ``PatchPool.load("sample_tiles/eurosat_ms")``.
        per_class: crops kept per class for the small pool (the first patches of each class).
        crop: side of the centre crops, in pixels.

    Returns:
        ``stats`` (N, C, 2) float32 per-patch per-band mean and standard deviation;
        ``labels`` (N,) int8; ``class_names``, ``bands``, ``sources`` (str arrays);
        ``pool_ids`` (P,) int16 patch ids of the crops; ``pool_patches`` (P, C, crop, crop) in
        the pool's dtype; ``band_mean`` / ``band_std`` (C,) float64 of the whole pool.

    Raises:
        DataError: the pool is unlabelled or multi-label, or its patches are smaller than
            ``crop``.
    """
    labels = pool.single_labels()
    height, width = pool.patch_size
    if height < crop or width < crop:
        raise DataError(f"patches of {height} x {width} px are smaller than the {crop} px crops")
    n, channels = len(pool), pool.n_bands
    stats = np.empty((n, channels, 2), dtype=np.float32)
    step = 64  # patches at a time: bounded float64 temporaries for any archive size
    for start in range(0, n, step):
        block = np.asarray(pool.patches[start : start + step], dtype=np.float64)
        stats[start : start + step, :, 0] = block.mean(axis=(2, 3))
        stats[start : start + step, :, 1] = block.std(axis=(2, 3))
    class_count = len(pool.class_names or [])
    ids = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(class_count)])
    top, left = (height - crop) // 2, (width - crop) // 2
    crops = np.ascontiguousarray(
        np.asarray(pool.patches[np.sort(ids)])[:, :, top : top + crop, left : left + crop]
    )
    paths = [os.path.abspath(s) for s in pool.sources]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    # Class folders: keep "<Class>/<file>" (the common folder is the archive's root).
    root = os.path.dirname(root) if len({os.path.dirname(p) for p in paths}) == 1 else root
    return {
        "stats": stats,
        "labels": labels.astype(np.int8),
        "class_names": np.array(pool.class_names or [], dtype=str),
        "bands": np.array(pool.bands, dtype=str),
        "sources": np.array([os.path.relpath(p, root).replace(os.sep, "/") for p in paths]),
        "pool_ids": np.sort(ids).astype(np.int16),
        "pool_patches": crops,
        "band_mean": np.asarray(pool.band_mean, dtype=np.float64),
        "band_std": np.asarray(pool.band_std, dtype=np.float64),
    }


def write_sample_file(folder: str | Path, out: str | Path = SAMPLE_FILE) -> Path:
    """Regenerate the shipped sample from a class-per-folder archive of real tiles.

    Args:
        folder: e.g. ``sample_tiles/eurosat_ms``.
        out: the ``.npz`` to write.

    Returns:
        the path written.
    """
    from anneal_geo.data.pool import PatchPool

    arrays = sample_arrays(PatchPool.load(Path(folder)))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **arrays)  # type: ignore[arg-type]
    return target


def spectral_embeddings(stats: np.ndarray) -> np.ndarray:
    """Embeddings from per-band statistics: log, standardised per column, L2-normalised.

    Args:
        stats: (N, C, 2) per-band mean and standard deviation of each patch.

    Returns:
        (N, 2C) float32 unit vectors.
    """
    features = np.log1p(np.maximum(stats.reshape(stats.shape[0], -1).astype(np.float64), 0.0))
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _sample_from_arrays(arrays: dict[str, np.ndarray], origin: str) -> Sample:
    from anneal_geo.data.pool import PatchPool

    labels = arrays["labels"].astype(np.int64)
    class_names = tuple(str(c) for c in arrays["class_names"])
    sources = tuple(str(s) for s in arrays["sources"])
    ids = arrays["pool_ids"].astype(np.int64)
    pool = PatchPool(
        _read_only(np.ascontiguousarray(arrays["pool_patches"])),
        [str(b) for b in arrays["bands"]],
        class_names=class_names,
        labels=labels[ids],
        sources=[sources[i] for i in ids],
        band_mean=arrays["band_mean"],
        band_std=arrays["band_std"],
    )
    return Sample(
        embeddings=_read_only(spectral_embeddings(arrays["stats"])),
        labels=_read_only(labels),
        class_names=class_names,
        sources=sources,
        pool=pool,
        origin=origin,
    )


@cache
def _load_sample(key: str) -> Sample:
    if key:
        from anneal_geo.data.pool import PatchPool

        return _sample_from_arrays(sample_arrays(PatchPool.load(Path(key))), key)
    if not SAMPLE_FILE.is_file():
        raise DataError(
            f"the conformance sample {SAMPLE_FILE} is missing; reinstall anneal-geo, or pass "
            "sample=load_sample('<class-per-folder archive>')"
        )
    with np.load(SAMPLE_FILE, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return _sample_from_arrays(arrays, f"{SAMPLE_FILE.name} (EuroSAT-MS, shipped)")


def load_sample(source: str | Path | None = None) -> Sample:
    """The sample the checks run on, loaded once per process.

    Args:
        source: None for the shipped EuroSAT-MS sample; or a class-per-folder archive of real
            tiles (at least ``3`` patches of 16 x 16 px or more per class) to build one from.
    """
    return _load_sample(str(Path(source).resolve()) if source is not None else "")


def _all_pairs(n: int) -> np.ndarray:
    upper = np.triu_indices(n, 1)
    return np.stack(upper, axis=1).astype(np.int64)


#: Seed of the pairs the checks use (fixed: every run checks the same pairs).
_DATA_SEED = 20240601


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


# -- running checks --------------------------------------------------------------------------


class _Abort(Exception):
    """A prerequisite check failed: the remaining checks cannot run."""


def _label(cls: type) -> str:
    return getattr(cls, "plugin_origin", "") or f"plugin {cls.__module__}:{cls.__qualname__}"


def _one_line(exc: BaseException, label: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text.startswith(label + ": "):
        text = text[len(label) + 2 :]
    if isinstance(exc, AssertionError | AnnealError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Checks:
    """Runs named checks, recording passes and failures; raises once at the end."""

    def __init__(self, label: str, group: str) -> None:
        self.label = label
        self.report = ConformanceReport(label, group)
        self.failures: list[tuple[str, str]] = []

    @contextmanager
    def check(self, name: str, *, critical: bool = False) -> Iterator[None]:
        try:
            yield
        except _Abort:
            raise
        except Exception as exc:
            self.failures.append((name, _one_line(exc, self.label)))
            if critical:
                raise _Abort(name) from exc
        else:
            self.report.passed.append(name)

    def skip(self, name: str, why: str) -> None:
        self.report.skipped[name] = why

    def finish(self) -> ConformanceReport:
        if self.failures:
            total = len(self.failures) + len(self.report.passed)
            names = ", ".join(f"'{name}'" for name, _ in self.failures)
            lines = [
                f"{self.label} failed {len(self.failures)} of {total} {self.report.group[:-1]} "
                f"conformance checks: {names}"
            ]
            lines += [f"  - {name}: {detail}" for name, detail in self.failures]
            raise ConformanceError("\n".join(lines))
        return self.report


def _expect(condition: bool, detail: str) -> None:
    if not condition:
        raise AssertionError(detail)


def _same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Assert two result arrays agree (up to :data:`_RTOL`), saying where they differ."""
    a, b = np.asarray(a), np.asarray(b)
    _expect(a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape} differ")
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        bad = int(np.count_nonzero(a != b))
        _expect(bad == 0, f"{what}: {bad} of {a.size} values differ")
        return
    close = np.isclose(a, b, rtol=_RTOL, atol=_RTOL * (1.0 + float(np.max(np.abs(a), initial=0))))
    if not close.all():
        worst = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        raise AssertionError(
            f"{what}: {int((~close).sum())} of {a.size} values differ (largest difference "
            f"{worst:.3g})"
        )


def contract_version(group: str) -> int:
    """The contract version anneal-geo provides for ``group`` (its base class's
    ``contract_version``, else :data:`CONTRACT_VERSIONS`)."""
    base = plugins.base_class(_group(group))
    return int(getattr(base, "contract_version", CONTRACT_VERSIONS[_group(group)]))


def _group(group: str) -> str:
    """Accept ``estimators``, ``estimator`` or ``anneal_geo.estimators``."""
    short = group.removeprefix("anneal_geo.")
    short = short if short in plugins.GROUPS else short + "s"
    if short not in plugins.GROUPS:
        known = ", ".join(plugins.GROUPS)
        raise PluginError(f"unknown plugin group '{group}'; known groups: {known}")
    return short


def _own_parameters(cls: type, name: str) -> list[inspect.Parameter] | None:
    """The parameters of method ``name`` as the engine calls it (without self/cls)."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return list(inspect.signature(raw.__func__).parameters.values())
    func = raw.__func__ if isinstance(raw, classmethod) else raw
    if not callable(func):
        return None
    return list(inspect.signature(func).parameters.values())[1:]


def _signature_problem(cls: type, base: type, name: str) -> str:
    """Why ``cls.name`` cannot be called the way the engine calls ``base.name``, or ''."""
    if getattr(cls, name, None) is getattr(base, name):
        return ""  # inherited unchanged
    params = _own_parameters(cls, name)
    if params is None:
        return f"{name} is not a method"
    if inspect.iscoroutinefunction(getattr(cls, name)):
        return f"{name}() is async; the engine calls it synchronously"
    wanted = list(inspect.signature(getattr(base, name)).parameters.values())[1:]
    shown = f"{name}({', '.join(['self', *(p.name for p in wanted)])})"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    for index, want in enumerate(wanted):
        have = params[index] if index < len(params) else None
        if have is None or have.kind not in positional:
            if varargs:
                continue
            return f"{name}() cannot take the argument '{want.name}'; the contract is {shown}"
        if have.name != want.name:
            return (
                f"{name}() names its argument {index + 1} '{have.name}', the contract calls it "
                f"'{want.name}': {shown}"
            )
    for extra in params[len(wanted) :]:
        required = extra.default is inspect.Parameter.empty and extra.kind in (
            *positional,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if required:
            return (
                f"{name}() has a required extra argument '{extra.name}' the engine never "
                f"passes; give it a default (the contract is {shown})"
            )
    return ""


def _contract_checks(c: _Checks, group: str, cls: type, is_class: bool) -> None:
    """Checks on the class itself: base class, methods, signatures, attributes."""
    base = plugins.base_class(group)
    with c.check("subclass", critical=True):
        _expect(
            inspect.isclass(cls) and issubclass(cls, base),
            f"{cls!r} does not subclass {base.__module__}.{base.__qualname__}",
        )
    with c.check("implemented", critical=True):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        _expect(not missing, f"{cls.__qualname__} does not implement {', '.join(missing)}")
    with c.check("signatures"):
        problems = [p for p in (_signature_problem(cls, base, m) for m in _METHODS[group]) if p]
        _expect(not problems, "; ".join(problems))
    if is_class:
        with c.check("constructor", critical=True):
            try:
                inspect.signature(cls).bind(seed=0)
            except TypeError as exc:
                raise AssertionError(
                    f"{cls.__qualname__}(seed=0) is not a valid call ({exc}); the engine "
                    "creates every plugin with its session's seed"
                ) from None
    with c.check("capabilities"):
        wrong = [
            f"{attr}={getattr(cls, attr)!r}"
            for attr in _CAPABILITIES[group]
            if not isinstance(getattr(cls, attr, None), bool)
        ]
        _expect(not wrong, f"capability attributes must be True or False: {', '.join(wrong)}")
    with c.check("description"):
        own = cls.__dict__.get("__doc__") or getattr(cls, "description", "")
        _expect(
            bool(str(own or "").strip()),
            "the class has no docstring of its own; `anneal-geo plugins list` would show the "
            "base class's description (add a one-line docstring)",
        )
    with c.check("contract version"):
        provided = contract_version(group)
        declared = getattr(cls, "contract_version", provided)
        _expect(
            isinstance(declared, int) and declared == provided,
            f"written for {group[:-1]} contract version {declared!r}, this anneal-geo provides "
            f"version {provided}",
        )


def _factory(obj: Any, options: dict[str, Any] | None) -> Callable[[], Any]:
    """Fresh plugin instances: ``cls(seed=0, **options)``, or deep copies of an instance."""
    if inspect.isclass(obj):
        settings = {"seed": 0, **(options or {})}

        def make() -> Any:
            return obj(**settings)

        return make
    if options:
        raise PluginError("options are only used with a plugin class, not an instance")
    return lambda: copy.deepcopy(obj)


def _check(
    group: str,
    obj: Any,
    body: Callable[[_Checks, Callable[[], Any], type, Sample], None],
    options: dict[str, Any] | None,
    sample: Sample | None,
) -> ConformanceReport:
    is_class = inspect.isclass(obj)
    cls = obj if is_class else type(obj)
    c = _Checks(_label(cls), group)
    try:
        _contract_checks(c, group, cls, is_class)
        make = _factory(obj, options)
        with c.check("instance", critical=True):
            made = make()
            base = plugins.base_class(group)
            _expect(isinstance(made, base), f"the constructor made {type(made).__name__}")
        body(c, make, cls, sample if sample is not None else load_sample())
    except _Abort:
        pass
    return c.finish()


# -- estimators ------------------------------------------------------------------------------


def check_estimator(
    estimator: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check an estimator class (or instance) against the estimator contract.

    Checks, on the sample's embeddings: the contract checks (subclass, methods implemented,
    ``fit``/``score`` signatures, ``cls(seed=0)``, capability flags, docstring, contract
    version); fit on labelled pairs of two rounds and score 3,000 pairs through
    ``checked_fit``/``checked_score`` (shape (M,), floating, finite); inputs left unchanged;
    the same scores from a second instance with the same seed; the same score for (i, j) and
    (j, i) when ``symmetric``; zero pairs and one pair to score; a fit on zero pairs, on one
    pair and on pairs of one class only (all of which the engine can produce) followed by
    valid scores.

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
    return _check("estimators", estimator, _estimator_checks, options, sample)


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


# -- selectors -------------------------------------------------------------------------------


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
    return _check("selectors", selector, _selector_checks, options, sample)


def _selector_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    _, descriptors, uncertainty = sample.shortlist(_SHORTLIST, seed=_DATA_SEED)
    m = descriptors.shape[0]
    k = m // 10

    def pick(sel: Any, desc: np.ndarray, unc: np.ndarray, count: int, seed: int = 7) -> Any:
        return sel.checked_select(desc.copy(), unc.copy(), count, np.random.default_rng(seed))

    with c.check("select", critical=True):
        chosen = pick(make(), descriptors, uncertainty, k)

    with c.check("inputs unchanged"):
        desc, unc = descriptors.copy(), uncertainty.copy()
        make().checked_select(desc, unc, k, np.random.default_rng(7))
        _expect(np.array_equal(desc, descriptors), "select() modified the descriptors")
        _expect(np.array_equal(unc, uncertainty), "select() modified the uncertainty")

    with c.check("deterministic"):
        _same(pick(make(), descriptors, uncertainty, k), chosen, "two generators with one seed")

    with c.check("only the given generator"):
        # Saved and restored: the check must leave the caller's global random state as it was.
        numpy_state = np.random.get_state()  # noqa: NPY002
        python_state = random.getstate()
        try:
            results = []
            for seed in (1, 2):
                np.random.seed(seed)  # noqa: NPY002 - on purpose: must not matter
                random.seed(seed)
                results.append(pick(make(), descriptors, uncertainty, k))
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002
            random.setstate(python_state)
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


# -- backbones -------------------------------------------------------------------------------


def check_backbone(
    backbone: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check a backbone class (or instance) against the backbone contract (imports torch).

    Checks, on real 13-band EuroSAT-MS patches in native units: the contract checks;
    ``checked_build`` for all 13 bands and for band subsets (RGB ``B04,B03,B02``, the bands
    reordered, the single band ``B08``): each either builds or is refused with an anneal-geo
    error naming the problem (noted in the report), at least one builds, and any other
    exception fails; every built module maps a batch to finite float32 (B, out_dim)
    features in eval mode; a batch of one; a patch's features do not depend on the rest of
    its batch; the input tensor is left unchanged; two builds with the same seed give the
    same features whatever torch's global seed; a ``trainable`` backbone has parameters that
    receive finite gradients.

    Args and raises: as :func:`check_estimator`.
    """
    return _check("backbones", backbone, _backbone_checks, options, sample)


def _band_sets(bands: Sequence[str]) -> list[tuple[str, list[str]]]:
    sets = [("all bands", list(bands))]
    if {"B04", "B03", "B02"} <= set(bands):
        sets.append(("RGB B04,B03,B02", ["B04", "B03", "B02"]))
    if len(bands) > 1:
        sets.append(("bands reordered", list(bands)[::-1]))
    if "B08" in bands:
        sets.append(("one band B08", ["B08"]))
    return sets


def _backbone_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    import torch

    pool = sample.pool
    position = {b: i for i, b in enumerate(pool.bands)}
    patches = torch.from_numpy(pool.float_patches())
    # Four patches of four classes (the pool holds its crops class by class).
    rows = [r for r in (0, _PER_CLASS, 2 * _PER_CLASS, 3 * _PER_CLASS) if r < len(pool)]

    def inputs(bands: Sequence[str]) -> tuple[list[float], list[float], torch.Tensor]:
        idx = [position[b] for b in bands]
        mean = [float(pool.band_mean[i]) for i in idx]
        std = [float(pool.band_std[i]) for i in idx]
        return mean, std, patches[rows][:, idx].contiguous()

    def features(bb: Any, module: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(x.clone())
        out = bb.check_features(out, x.shape[0], module.out_dim)
        _expect(out.dtype == torch.float32, f"forward() returned {out.dtype}, expected float32")
        return out

    built: dict[str, tuple[Any, Any, list[str]]] = {}
    with c.check("build", critical=True):
        refused: dict[str, str] = {}
        for what, bands in _band_sets(pool.bands):
            mean, std, _ = inputs(bands)
            bb = make()
            try:
                module = bb.checked_build(bands, mean, std)
            except PluginError:
                raise
            except AnnealError as exc:  # a clear refusal, e.g. weights that need other bands
                refused[what] = str(exc).splitlines()[0]
                continue
            built[what] = (bb, module.eval(), bands)
        if refused:
            c.report.notes["build"] = "; ".join(f"{k} refused: {v}" for k, v in refused.items())
        _expect(bool(built), f"every band set was refused ({c.report.notes.get('build')})")

    first, (bb, module, bands) = next(iter(built.items()))
    mean, std, batch = inputs(bands)
    with c.check("forward", critical=True):
        reference = features(bb, module, batch)

    with c.check("band subsets"):
        for what, (other_bb, other_module, other_bands) in built.items():
            if what != first:
                features(other_bb, other_module, inputs(other_bands)[2])

    with c.check("batch of one"):
        single = features(bb, module, batch[:1])
    with c.check("batch independence"):
        _same(single.numpy(), reference[:1].numpy(), "a patch alone against in a batch (eval)")
    with c.check("input unchanged"):
        given = batch.clone()
        with torch.no_grad():
            module(given)
        _expect(torch.equal(given, batch), "forward() modified its input tensor")

    with c.check("deterministic"):
        outs = []
        with torch.random.fork_rng(devices=[]):
            for global_seed in (1, 2):
                torch.manual_seed(global_seed)  # must not matter: the backbone has a seed
                twin = make()
                outs.append(features(twin, twin.checked_build(bands, mean, std).eval(), batch))
        _same(outs[0].numpy(), outs[1].numpy(), "two builds with the same seed")
        _same(outs[0].numpy(), reference.numpy(), "a build against the first build")

    if not getattr(cls, "trainable", True):
        c.skip("trainable", "the backbone declares trainable = False")
    else:
        with c.check("trainable"):
            fresh = make()
            net = fresh.checked_build(bands, mean, std).train()
            params = [p for p in net.parameters() if p.requires_grad]
            _expect(bool(params), "trainable = True but the module has no trainable parameters")
            loss = net(batch.clone()).pow(2).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            got = [g for g in grads if g is not None]
            _expect(bool(got), "no parameter receives a gradient from the features")
            _expect(all(bool(torch.isfinite(g).all()) for g in got), "non-finite gradients")


# -- annotators ------------------------------------------------------------------------------


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
    return _check("annotators", annotator, _annotator_checks, options, sample)


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


# -- by registry name ------------------------------------------------------------------------

_CHECKERS: dict[str, Callable[..., ConformanceReport]] = {
    "estimators": check_estimator,
    "selectors": check_selector,
    "backbones": check_backbone,
    "annotators": check_annotator,
}


def check_plugin(
    group: str,
    name: str,
    *,
    options: dict[str, Any] | None = None,
    sample: Sample | None = None,
) -> ConformanceReport:
    """Check an installed plugin by its registry name: listed, loads, keeps its contract.

    Args:
        group: ``estimators``, ``selectors``, ``backbones`` or ``annotators`` (``estimator``
            and ``anneal_geo.estimators`` work too).
        name: the plugin name (``anneal-geo plugins list``).
        options: constructor options.
        sample: the data (default: :func:`load_sample`).

    Raises:
        ConformanceError: not installed, fails to load, or a check failed.
    """
    short = _group(group)
    found = [info for info in plugins.available(short) if info.name == name]
    if not found:
        known = ", ".join(info.name for info in plugins.available(short)) or "none"
        raise ConformanceError(
            f"no {short[:-1]} plugin named '{name}' is installed (known: {known}); install its "
            "distribution (pip install -e .) so its entry point is visible"
        )
    info = found[0]
    if info.distribution != "<in-process>" and (info.distribution == "unknown" or not info.version):
        raise ConformanceError(
            f"{info.origin} fails the 'listed' check: its entry point has no distribution "
            "name and version; declare it in an installed distribution's pyproject.toml"
        )
    try:
        cls = plugins.load(short, name)
    except PluginError as exc:
        raise ConformanceError(f"{info.origin} fails the 'load' check: {exc}") from exc
    report = _CHECKERS[short](cls, options=options, sample=sample)
    report.passed[:0] = ["listed", "load"]
    return report


def plugin_cases(group: str | None = None, *, distribution: str | None = None) -> list[Any]:
    """``(group, name)`` of every installed plugin, as pytest parameters with readable ids.

    Reads entry-point metadata only (imports no plugin), so it is cheap at collection time::

        @pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="my-dist"))
        def test_conformance(group, name):
            check_plugin(group, name)

    Args:
        group: only this group.
        distribution: only the plugins this distribution declares (``-``/``_`` and case are
            ignored).

    Returns:
        ``pytest.param(group, name, id="group/name")`` items (plain tuples without pytest).

    Raises:
        ConformanceError: ``distribution`` declares no plugin (not installed?), so a
            parametrised test is never silently empty.
    """
    groups = [_group(group)] if group else list(plugins.GROUPS)

    def norm(text: str) -> str:
        return text.lower().replace("_", "-")

    cases = [
        (g, info.name)
        for g in groups
        for info in plugins.available(g)
        if distribution is None or norm(info.distribution) == norm(distribution)
    ]
    if distribution is not None and not cases:
        raise ConformanceError(
            f"distribution '{distribution}' declares no {' or '.join(groups)} plugin; is it "
            "installed (pip install -e .) and are its entry points in pyproject.toml?"
        )
    pytest = sys.modules.get("pytest")
    if pytest is None:
        return cases
    return [pytest.param(g, name, id=f"{g}/{name}") for g, name in cases]


# -- a real session --------------------------------------------------------------------------


def run_sample_session(
    directory: str | Path,
    *,
    data: str | Path | None = None,
    rounds: int = 1,
    budget: int = 10,
    initial: int = 20,
    epochs: int = 5,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Run a real ANNEAL session (Engine, simulated oracle) and return its history records.

    Use it to show that a plugin works in the loop, e.g.
    ``run_sample_session(tmp_path, estimator="mine")``.

    Args:
        directory: the new session directory.
        data: a class-per-folder archive or pool directory; None for the sample's small
            pool of real patches (30 crops of 16 x 16 px, 10 classes).
        rounds: rounds after the initial set.
        budget: pairs per round.
        initial: pairs of the initial set.
        epochs: training epochs per round.
        **settings: any other :class:`~anneal_geo.session.SessionConfig` setting
            (``estimator``, ``selector``, ``backbone``, ``estimator_options``, ...).
    """
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine
    from anneal_geo.session import Session, SessionConfig

    if data is None:
        pool = load_sample().pool
        source = "anneal_geo.testing sample"
    else:
        pool = PatchPool.load(Path(data))
        source = str(data)
    config = SessionConfig(
        data=source, rounds=rounds, budget=budget, initial=initial, epochs=epochs, **settings
    )
    session = Session.create(Path(directory), config)
    with Engine(session, pool, progress=False) as engine:
        return engine.run()


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m anneal_geo.testing FOLDER``: regenerate the shipped sample from FOLDER."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m anneal_geo.testing sample_tiles/eurosat_ms")
    path = write_sample_file(args[0])
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    _main()
