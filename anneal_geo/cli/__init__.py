"""The ``anneal-geo`` command.

One module per command group (``run``, ``pool``, ``label``, ``session``, ``plugins``,
``geo``, ``export``, ``embed``), each registered as an entry point of the group
``anneal_geo.cli`` and added to the root app by :mod:`anneal_geo.cli.root`. This package's
``__init__`` imports nothing: ``app`` and ``main`` are looked up on first use, and command
modules never import it, so there is no import circle. Heavy libraries are imported inside
the commands, so ``anneal-geo --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["app", "main"]

if TYPE_CHECKING:
    from anneal_geo.cli.root import app, main


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("anneal_geo.cli.root"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
