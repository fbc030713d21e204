"""Labelling by hand: one controller, and the front ends a person answers in.

* :mod:`~anneal_geo.labelling.controller`: :class:`LabellingController`, the next pair,
  answer, skip, undo, train-and-continue and counters, shared by every front end.
* :mod:`~anneal_geo.labelling.web`: the local web labeller (``anneal-geo label SESSION
  --web``), a Starlette app served by uvicorn; its page lives in ``static/``.
* :mod:`~anneal_geo.labelling.widget`: the Jupyter widget on anywidget, the same page.
* :mod:`~anneal_geo.labelling.locator`: the pair's place on its scene, for tile pools.
* :mod:`~anneal_geo.labelling.maps`: interactive maps in Jupyter (ipyleaflet, offline).

Nothing heavy is imported with this package: Starlette, uvicorn, anywidget and ipyleaflet
are imported by the modules that need them, when they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anneal_geo.labelling.controller import LabellingController

__all__ = ["LabellingController"]


def __getattr__(name: str) -> Any:
    if name == "LabellingController":
        from anneal_geo.labelling.controller import LabellingController

        return LabellingController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
