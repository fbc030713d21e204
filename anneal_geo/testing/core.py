"""What every contract shares: the group names, the checks on the class, running a contract."""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np

from anneal_geo import plugins
from anneal_geo.errors import PluginError
from anneal_geo.testing.report import ConformanceReport, _Abort, _Checks, _expect, _label
from anneal_geo.testing.sample import Sample, load_sample

__all__ = [
    "CONTRACT_CHECKS",
    "CONTRACT_VERSIONS",
    "HEAVY_MODULES",
    "contract_version",
    "global_seeds",
    "global_state",
]

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
_CAPABILITIES: dict[str, tuple[str, ...]] = plugins.CAPABILITIES

#: Libraries a plugin module must not import at its top: `anneal-geo plugins list` imports
#: every plugin module, so one such import slows every command down (torch alone: seconds).
HEAVY_MODULES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "torchgeo",
    "faiss",
    "rasterio",
    "geopandas",
    "sklearn",
    "tensorflow",
    "jax",
    "matplotlib",
)

#: The checks on the class every contract runs first, in order.
CONTRACT_CHECKS: tuple[str, ...] = (
    "subclass",
    "implemented",
    "signatures",
    "constructor",
    "capabilities",
    "description",
    "contract version",
    "light import",
    "instance",
)


@cache
def _heavy_imports(module: str, path: tuple[str, ...]) -> tuple[list[str], float] | str:
    """What importing ``module`` in a fresh interpreter pulls in among :data:`HEAVY_MODULES`
    and how long it takes; a string saying why it could not be imported."""
    code = (
        "import importlib, json, sys, time\n"
        "start = time.perf_counter()\n"
        f"importlib.import_module({module!r})\n"
        "took = time.perf_counter() - start\n"
        f"print(json.dumps([[m for m in {list(HEAVY_MODULES)!r} if m in sys.modules], took]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"a fresh interpreter could not import it ({type(exc).__name__})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"a fresh interpreter could not import it ({last[:120]})"
    heavy, took = json.loads(done.stdout.strip().splitlines()[-1])
    return list(heavy), float(took)


def _light_import(c: _Checks, cls: type) -> None:
    module = cls.__module__
    target = f"{module}:{cls.__qualname__}"
    listed = any(
        info.target == target
        for group in plugins.GROUPS
        for info in plugins.available(group)
        if info.distribution != "<in-process>"
    )
    if not listed:
        c.skip(
            "light import",
            "not an installed entry point (only those are imported by `anneal-geo plugins list`)",
        )
        return
    found = _heavy_imports(module, tuple(sys.path))
    if isinstance(found, str):
        c.skip("light import", found)
        return
    heavy, took = found
    with c.check("light import"):
        _expect(
            not heavy,
            f"importing {module} imports {', '.join(heavy)} ({took:.2f} s): `anneal-geo plugins "
            "list` imports every plugin module, so import heavy libraries inside the methods "
            "that need them",
        )


def global_state() -> tuple[Any, ...]:
    """A comparable snapshot of numpy's and Python's global random state: a plugin must
    leave them as it found them (the caller's own draws depend on them). Torch's global
    generator is left out: the engine seeds it itself before building a trunk, and
    ``torch.manual_seed(self.seed)`` in ``build`` is an accepted way to initialise one."""
    numpy_state = np.random.get_state()  # noqa: NPY002
    return numpy_state[1].tobytes(), numpy_state[2], hash(random.getstate())


@contextmanager
def global_seeds(seed: int) -> Iterator[None]:
    """Seed numpy's, Python's and (when imported) torch's global generators with ``seed``,
    and restore them afterwards: a plugin's results must not depend on them."""
    numpy_state = np.random.get_state()  # noqa: NPY002
    python_state = random.getstate()
    torch = sys.modules.get("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    try:
        np.random.seed(seed)  # noqa: NPY002 - on purpose: must not matter
        random.seed(seed)
        if torch is not None:
            torch.manual_seed(seed)
        yield
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
        if torch is not None and torch_state is not None:
            torch.random.set_rng_state(torch_state)


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
    _light_import(c, cls)


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
    checks: tuple[str, ...] = (),
) -> ConformanceReport:
    """Run the contract checks, then ``body``; ``checks`` names the body's checks, so those a
    failed prerequisite kept from running are reported as skipped."""
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
    except _Abort as abort:
        c.not_run((*CONTRACT_CHECKS, *checks), str(abort))
    return c.finish()
