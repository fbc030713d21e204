"""Plugin options: which options a plugin class accepts, and reading them from the command line.

A plugin's options are the keyword parameters of its ``__init__`` (without ``seed``, which
the session sets), followed up the class hierarchy for as long as an ``__init__`` passes
``**options`` on to its parent, down to the contract base class (whose own parameters, such
as a backbone's ``weights``, count too). A plugin that reads options out of ``**options``
itself declares them in the class attribute ``declared_options`` (name -> default). The
contract base classes reject any other option with one line listing the accepted ones, so a
typo such as ``kk=3`` is an error instead of a silently stored setting.

On the command line options are ``KEY=VALUE`` with the value read as a TOML scalar
(``k=3`` is the integer 3, ``weight=0.5`` a float, ``bands=["B04","B03"]`` a list,
``fast=true`` a boolean); a value that is not TOML is taken as a string (``pick=centroid``).
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from anneal_geo.errors import ConfigError

__all__ = [
    "REQUIRED",
    "OptionSpec",
    "check_options",
    "option_specs",
    "parse_assignments",
    "parse_value",
]


class _Required:
    def __repr__(self) -> str:
        return "(required)"


#: The default of an option that has none.
REQUIRED: Any = _Required()

#: Parameters that are never plugin options (the session sets the seed).
_NOT_OPTIONS = frozenset({"self", "seed"})

_DOC_SECTION = re.compile(r"^\s*(Args|Arguments|Options|Parameters):\s*$")
_DOC_ITEM = re.compile(r"^(\s+)(\*{0,2}\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


@dataclass(frozen=True)
class OptionSpec:
    """One option a plugin accepts.

    Attributes:
        name: the option name (``threshold``).
        default: its default, or :data:`REQUIRED`.
        type: its type as written in the signature (``"str"``), or the default's type name
            for a declared option, or ``""`` when unknown.
        description: the first line the docstrings give for it, or ``""``.
        owner: the class that declares it.
    """

    name: str
    default: Any
    type: str
    description: str
    owner: str


def _doc_items(doc: str | None) -> dict[str, str]:
    """``name -> text`` of the items of the Args/Options sections of a Google-style
    docstring (continuation lines joined)."""
    found: dict[str, str] = {}
    if not doc:
        return found
    lines = inspect.cleandoc(doc).splitlines()
    in_section = False
    indent: int | None = None
    current: str | None = None
    for line in lines:
        if _DOC_SECTION.match(line):
            in_section, indent, current = True, None, None
            continue
        if not in_section:
            continue
        if not line.strip():  # a blank line ends the item, not the section
            current = None
            continue
        if not line[0].isspace():  # the next section (or prose) starts
            in_section, current = False, None
            continue
        match = _DOC_ITEM.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            name = match.group(2).lstrip("*")
            current = None if name in found else name
            if current is not None:
                found[current] = match.group(3).strip()
        elif current is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            found[current] = f"{found[current]} {line.strip()}".strip()
    return found


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", str(annotation))


def option_specs(cls: type) -> dict[str, OptionSpec]:
    """Every option ``cls`` accepts, in declaration order (see the module docs)."""
    specs: dict[str, OptionSpec] = {}
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        docs = {**_doc_items(klass.__dict__.get("__doc__")), **docs}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        declared: Mapping[str, Any] = klass.__dict__.get("declared_options") or {}
        for name, default in declared.items():
            specs.setdefault(
                name,
                OptionSpec(
                    name,
                    default,
                    "" if default is None else type(default).__name__,
                    docs.get(name, ""),
                    klass.__qualname__,
                ),
            )
        if init is None:
            continue
        init_docs = _doc_items(getattr(init, "__doc__", None))
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):  # no signature to read: accept what is declared
            break
        passes_on = False
        for param in params:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif (
                param.kind
                in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                and param.name not in _NOT_OPTIONS
            ):
                default = REQUIRED if param.default is inspect.Parameter.empty else param.default
                specs.setdefault(
                    param.name,
                    OptionSpec(
                        param.name,
                        default,
                        _type_name(param.annotation),
                        init_docs.get(param.name) or docs.get(param.name, ""),
                        klass.__qualname__,
                    ),
                )
        if "_contract_base" in klass.__dict__ or not passes_on:
            break
    return specs


def check_options(cls: type, options: Iterable[str], kind: str, name: str = "") -> None:
    """Raise :class:`ConfigError` when ``options`` holds a name ``cls`` does not accept.

    Args:
        cls: the plugin class.
        options: the option names given.
        kind: ``estimator``, ``selector``, ``backbone`` or ``annotator``.
        name: the plugin's registry name (``mgue``); the class name when empty.
    """
    specs = option_specs(cls)
    unknown = sorted(set(options) - set(specs) - _NOT_OPTIONS)
    if not unknown:
        return
    accepted = ", ".join(specs) if specs else "no options"
    plural = "s" if len(unknown) > 1 else ""
    what = f"{kind} '{name}'" if name else f"{kind} {cls.__qualname__}"
    hint = f" (see `anneal-geo plugins show {name}`)" if name else ""
    raise ConfigError(
        f"{what} has no option{plural} {', '.join(repr(u) for u in unknown)}; it accepts: "
        f"{accepted}{hint}"
    )


def parse_value(text: str) -> Any:
    """A command-line value as a TOML scalar (or array/inline table); else the string itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: Iterable[str], option: str) -> dict[str, Any]:
    """``["k=3", "pick=centroid"]`` -> ``{"k": 3, "pick": "centroid"}``.

    Raises:
        ConfigError: an item is not ``KEY=VALUE`` (the message names ``option``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{option} {item!r} must be KEY=VALUE, e.g. {option} k=3")
        out[key] = parse_value(value.strip())
    return out
