"""What every contract shares: the group names, the checks on the class, running a contract."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from anneal_geo import plugins
from anneal_geo.errors import PluginError
from anneal_geo.testing.report import ConformanceReport, _Abort, _Checks, _expect, _label
from anneal_geo.testing.sample import Sample, load_sample

__all__ = ["CONTRACT_VERSIONS", "contract_version"]

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
