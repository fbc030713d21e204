"""Running named checks and reporting them: the conformance kit's machinery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from anneal_geo.errors import AnnealError

__all__ = ["ConformanceError", "ConformanceReport"]

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
            band subset the backbone refused with a clear error); ``notes["time"]`` says how
            long each main call took on the sample.
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


def _duration(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


class _Abort(Exception):
    """A prerequisite check failed: the remaining checks cannot run."""


def _label(cls: type) -> str:
    """How the kit names a plugin: its registry origin when the registry loaded this very
    class, else ``module:Class`` (a subclass of an installed plugin is named as itself)."""
    own = cls.__dict__.get("plugin_origin", "")
    return own or f"plugin {cls.__module__}:{cls.__qualname__}"


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
        self.times: list[str] = []

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

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Time one call of the plugin and note it in the report (``notes["time"]``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.times.append(f"{what} {_duration(took)}")
            self.report.notes["time"] = "; ".join(self.times)

    def skip(self, name: str, why: str) -> None:
        self.report.skipped[name] = why

    def not_run(self, names: tuple[str, ...], after: str) -> None:
        """List the checks a failed prerequisite ``after`` kept from running as skipped."""
        done = {*self.report.passed, *self.report.skipped, *(n for n, _ in self.failures)}
        for name in names:
            if name not in done:
                self.skip(name, f"not run: the '{after}' check failed")

    def finish(self) -> ConformanceReport:
        if self.failures:
            total = len(self.failures) + len(self.report.passed)
            names = ", ".join(f"'{name}'" for name, _ in self.failures)
            lines = [
                f"{self.label} failed {len(self.failures)} of {total} {self.report.group[:-1]} "
                f"conformance checks: {names}"
            ]
            lines += [f"  - {name}: {detail}" for name, detail in self.failures]
            lines += [f"  skipped {name}: {why}" for name, why in self.report.skipped.items()]
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
