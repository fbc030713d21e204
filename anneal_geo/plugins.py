"""The plugin registry: entry-point groups, lazy listing, loading, validation, ``register()``.

Every built-in estimator, selector, backbone and annotator is registered through
anneal-geo's own ``pyproject.toml`` entry points, so the path a third-party plugin takes
is the path that is always exercised.

Listing (:func:`available`) reads entry-point metadata only and imports no plugin
module. A plugin is imported by :func:`load` when it is used; one that fails to import
or breaks its contract raises :class:`~anneal_geo.errors.PluginError` naming the plugin
and the distribution that provides it, and :func:`inspect_all` reports it as broken
without raising. Discovery is split into small pure functions (collect, deduplicate,
sort) so each can be tested alone.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

from anneal_geo._options import OptionSpec, check_options, option_specs
from anneal_geo.errors import PluginError

__all__ = [
    "CAPABILITIES",
    "GROUPS",
    "PluginDescription",
    "PluginInfo",
    "available",
    "base_class",
    "create",
    "describe",
    "find",
    "inspect_all",
    "load",
    "provenance",
    "refresh",
    "register",
    "unregister",
]

#: Short group name -> entry-point group.
GROUPS: dict[str, str] = {
    "estimators": "anneal_geo.estimators",
    "selectors": "anneal_geo.selectors",
    "backbones": "anneal_geo.backbones",
    "annotators": "anneal_geo.annotators",
}

_BASES: dict[str, tuple[str, str]] = {
    "estimators": ("anneal_geo.estimators.base", "Estimator"),
    "selectors": ("anneal_geo.selectors.base", "Selector"),
    "backbones": ("anneal_geo.backbones.base", "Backbone"),
    "annotators": ("anneal_geo.annotators.base", "Annotator"),
}

#: Capability attributes of each contract (class attributes, each True or False).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "estimators": ("needs_labels", "symmetric", "uses_embeddings"),
    "selectors": (),
    "backbones": ("trainable",),
    "annotators": ("interactive", "needs_labels"),
}

#: The distribution that wins a name clash among entry points.
BUILTIN_DISTRIBUTION = "anneal-geo"
_IN_PROCESS = "<in-process>"

Status = Literal["unchecked", "ok", "broken"]


@dataclass(frozen=True)
class PluginInfo:
    """What is known about one plugin.

    Attributes:
        name: the name users pass (``--estimator mgue``).
        group: short group name, one of :data:`GROUPS`.
        target: ``module:Class``.
        distribution: the installed distribution that declares it (``<in-process>`` for
            :func:`register`).
        version: that distribution's version.
        status: ``unchecked`` (listed from metadata only), ``ok`` or ``broken``.
        reason: why it is broken, one line.
        description: first line of the class docstring (known once loaded).
    """

    name: str
    group: str
    target: str
    distribution: str
    version: str
    status: Status = "unchecked"
    reason: str = ""
    description: str = ""

    @property
    def origin(self) -> str:
        """``name`` from ``distribution version``, for messages."""
        version = f" {self.version}" if self.version else ""
        kind = self.group[:-1]
        return f"{kind} plugin '{self.name}' ({self.target}, from {self.distribution}{version})"


_registered: dict[str, dict[str, type]] = {group: {} for group in GROUPS}
_warned: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()


def _check_group(group: str) -> str:
    if group not in GROUPS:
        known = ", ".join(GROUPS)
        raise PluginError(f"unknown plugin group '{group}'; known groups: {known}")
    return group


# -- discovery: small pure steps -------------------------------------------------------


def _entry_point_infos(group: str, eps: Iterable[EntryPoint]) -> list[PluginInfo]:
    """Turn entry points into :class:`PluginInfo` records (metadata only)."""
    infos = []
    for ep in eps:
        dist = ep.dist
        infos.append(
            PluginInfo(
                name=ep.name,
                group=group,
                target=ep.value,
                distribution=dist.name if dist is not None else "unknown",
                version=dist.version if dist is not None else "",
            )
        )
    return infos


def _precedence(info: PluginInfo) -> tuple[int, str, str]:
    """Sort key of a name clash: in-process first, then anneal-geo, then by distribution."""
    if info.distribution == _IN_PROCESS:
        rank = 0
    elif info.distribution.lower().replace("_", "-") == BUILTIN_DISTRIBUTION:
        rank = 1
    else:
        rank = 2
    return (rank, info.distribution.lower(), info.target)


def _deduplicate(infos: Iterable[PluginInfo]) -> list[PluginInfo]:
    """Keep one plugin per name, by :func:`_precedence`, and warn about the others."""
    by_name: dict[str, list[PluginInfo]] = {}
    for info in infos:
        by_name.setdefault(info.name, []).append(info)
    kept = []
    for name, candidates in by_name.items():
        # The same entry point can appear twice (an editable install seen on two paths).
        unique = {(c.distribution, c.target): c for c in candidates}
        ordered = sorted(unique.values(), key=_precedence)
        winner = ordered[0]
        clash = (winner.group, name, tuple((c.distribution, c.target) for c in ordered))
        if len(ordered) > 1 and clash not in _warned:
            _warned.add(clash)
            losers = ", ".join(f"{c.target} ({c.distribution})" for c in ordered[1:])
            warnings.warn(
                f"{winner.group[:-1]} plugin name '{name}' is declared more than once; "
                f"using {winner.target} ({winner.distribution}), ignoring {losers}",
                RuntimeWarning,
                stacklevel=3,
            )
        kept.append(winner)
    return sorted(kept, key=lambda i: i.name)


@cache
def _discovered(group: str) -> tuple[PluginInfo, ...]:
    eps = entry_points(group=GROUPS[group])
    return tuple(_entry_point_infos(group, eps))


def refresh() -> None:
    """Forget the cached listing, so newly installed plugins are found."""
    _discovered.cache_clear()
    _load_target.cache_clear()
    _warned.clear()


def available(group: str) -> list[PluginInfo]:
    """The plugins of ``group``, sorted by name. Reads metadata only; imports nothing.

    Args:
        group: ``estimators``, ``selectors``, ``backbones`` or ``annotators``.
    """
    _check_group(group)
    in_process = [
        PluginInfo(
            name=name,
            group=group,
            target=f"{cls.__module__}:{cls.__qualname__}",
            distribution=_IN_PROCESS,
            version="",
        )
        for name, cls in _registered[group].items()
    ]
    return _deduplicate([*in_process, *_discovered(group)])


def names(group: str) -> list[str]:
    """The plugin names of ``group``, sorted."""
    return [info.name for info in available(group)]


# -- loading and validation ------------------------------------------------------------


def base_class(group: str) -> type:
    """The contract base class of ``group`` (imported on demand)."""
    module, attr = _BASES[_check_group(group)]
    return getattr(importlib.import_module(module), attr)


def _contract_problem(cls: Any, group: str) -> str:
    """Why ``cls`` does not fulfil the contract of ``group``, or '' if it does."""
    base = base_class(group)
    if not inspect.isclass(cls):
        return f"entry point names {type(cls).__name__} {cls!r}, not a class"
    if not issubclass(cls, base):
        return f"{cls.__qualname__} does not subclass {base.__module__}.{base.__qualname__}"
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if abstract:
        return f"{cls.__qualname__} does not implement {', '.join(abstract)}"
    wanted = getattr(base, "contract_version", 1)
    declared = getattr(cls, "contract_version", wanted)
    if declared != wanted:
        return (
            f"{cls.__qualname__} was written for {group[:-1]} contract version {declared}, "
            f"this anneal-geo provides {wanted}; install a matching version of its distribution"
        )
    return ""


@cache
def _load_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def find(group: str, name: str) -> PluginInfo | None:
    """The listing of plugin ``name`` of ``group`` (metadata only), or None."""
    for info in available(_check_group(group)):
        if info.name == name:
            return info
    return None


def _find(group: str, name: str) -> PluginInfo:
    info = find(group, name)
    if info is not None:
        return info
    known = ", ".join(names(group)) or "none"
    raise PluginError(
        f"unknown {group[:-1]} '{name}'; known {group}: {known} "
        f"(see `anneal-geo plugins list --group {group}`)"
    )


def load(group: str, name: str) -> type:
    """Import and validate the plugin class ``name`` of ``group``.

    Raises:
        PluginError: unknown name (the message lists the known ones), import failure or
            contract violation (the message names the plugin and its distribution).
    """
    info = _find(_check_group(group), name)
    if info.distribution == _IN_PROCESS:
        cls: Any = _registered[group][name]
    else:
        try:
            cls = _load_target(info.target)
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginError(
                f"{info.origin} failed to import: {type(exc).__name__}: {exc}".splitlines()[0]
                + f" (reinstall or fix {info.distribution})"
            ) from exc
    problem = _contract_problem(cls, group)
    if problem:
        raise PluginError(f"{info.origin} breaks the {group[:-1]} contract: {problem}")
    # Error messages of the base class name the plugin and where it comes from.
    cls.plugin_name = name
    cls.plugin_origin = info.origin
    return cls


def create(group: str, name: str, /, **options: Any) -> Any:
    """Load plugin ``name`` of ``group`` and instantiate it with ``options``.

    Raises:
        ConfigError: an option the plugin does not accept (the message lists those it does).
        PluginError: as :func:`load`.
    """
    cls: Any = load(group, name)
    check_options(cls, options, group[:-1], name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise PluginError(
            f"{cls.plugin_origin} does not accept the options {sorted(options)}: {exc}"
        ) from exc


def provenance(group: str, name: str) -> dict[str, Any]:
    """Where plugin ``name`` comes from, as a session records it: name, target, distribution,
    version and the contract version it was written for (loads the plugin)."""
    cls = load(group, name)
    info = _find(group, name)
    return {
        "name": name,
        "target": info.target,
        "distribution": info.distribution,
        "version": info.version,
        "contract_version": int(getattr(cls, "contract_version", 1)),
    }


@dataclass(frozen=True)
class PluginDescription:
    """What ``anneal-geo plugins show NAME`` prints about one plugin.

    Attributes:
        info: the listing (name, group, target, distribution, version).
        description: the class docstring's first paragraph.
        capabilities: capability attribute -> value.
        options: the options it accepts (see :mod:`anneal_geo._options`).
        contract_version: the contract version it was written for.
    """

    info: PluginInfo
    description: str
    capabilities: dict[str, Any]
    options: dict[str, OptionSpec]
    contract_version: int


def describe(group: str, name: str) -> PluginDescription:
    """Load plugin ``name`` of ``group`` and describe it (PluginError if it is broken)."""
    cls = load(group, name)
    doc = (getattr(cls, "description", "") or inspect.getdoc(cls) or "").strip()
    paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
    return PluginDescription(
        info=replace(_find(group, name), status="ok", description=_describe(cls)),
        description=paragraph,
        capabilities={attr: getattr(cls, attr, None) for attr in CAPABILITIES[group]},
        options=option_specs(cls),
        contract_version=int(getattr(cls, "contract_version", 1)),
    )


def _describe(cls: type) -> str:
    text = getattr(cls, "description", "") or inspect.getdoc(cls) or ""
    return text.strip().splitlines()[0] if text.strip() else ""


def inspect_all(group: str | None = None) -> list[PluginInfo]:
    """Load every plugin (of ``group``, or all groups) and report each as ok or broken.

    Never raises for a broken plugin: the reason is in :attr:`PluginInfo.reason`.
    """
    groups = [_check_group(group)] if group else list(GROUPS)
    report = []
    for g in groups:
        for info in available(g):
            try:
                cls = load(g, info.name)
            except PluginError as exc:
                report.append(replace(info, status="broken", reason=str(exc)))
            else:
                report.append(replace(info, status="ok", description=_describe(cls)))
    return report


def register(cls: type, name: str | None = None, group: str | None = None) -> type:
    """Add a plugin class in-process (for notebooks); it wins over an entry point of the same name.

    Args:
        cls: a subclass of one of the contract base classes.
        name: the plugin name; defaults to ``cls.name`` or the lower-cased class name.
        group: the group; inferred from the base class when omitted.

    Returns:
        ``cls``, so ``register`` also works as a class decorator.
    """
    if group is None:
        matches = [g for g in GROUPS if inspect.isclass(cls) and issubclass(cls, base_class(g))]
        if not matches:
            raise PluginError(
                f"cannot register {cls!r}: it subclasses none of the contract base classes "
                "(Estimator, Selector, Backbone, Annotator)"
            )
        group = matches[0]
    _check_group(group)
    problem = _contract_problem(cls, group)
    if problem:
        raise PluginError(f"cannot register {getattr(cls, '__qualname__', cls)}: {problem}")
    plugin_name = name or getattr(cls, "name", "") or cls.__name__.lower()
    _registered[group][plugin_name] = cls
    return cls


def unregister(name: str, group: str) -> None:
    """Remove a plugin added with :func:`register`."""
    _registered[_check_group(group)].pop(name, None)
