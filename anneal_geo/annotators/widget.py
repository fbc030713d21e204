"""The ``widget`` annotator: a person answers in Jupyter with the labelling widget.

The widget itself is :class:`anneal_geo.labelling.widget.LabellingWidget` (an anywidget on
the labelling controller, the same page and keys as ``anneal-geo label --web``); it is
importable from here too, under its former home. It is imported on first use, so listing
plugins stays light (no ipywidgets, no anywidget).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from anneal_geo.annotators.base import Annotator
from anneal_geo.errors import ConfigError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.labelling.widget import LabellingWidget

__all__ = ["LabellingWidget", "WidgetAnnotator"]


def __getattr__(name: str) -> Any:
    if name == "LabellingWidget":
        from anneal_geo.labelling.widget import LabellingWidget

        return LabellingWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WidgetAnnotator(Annotator):
    """A person answers in a Jupyter notebook with :class:`LabellingWidget`.

    The widget drives the engine itself (answer, undo, train), event by event, so it does
    not fit the pull-style :meth:`annotate` the engine's ``run()`` uses: that raises a
    ConfigError saying what to do instead. Use this name as a session's annotator when
    the answers come from the widget or the web page (it needs no labels, unlike the
    oracle).

    Args:
        seed: unused (a person is not seeded), kept for the plugin contract.
        bands: default picture bands for widgets of this session.
    """

    interactive: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False

    def __init__(self, seed: int = 0, bands: str | None = None, **options: Any) -> None:
        if options:
            raise ConfigError(
                f"widget annotator: unknown option(s) {', '.join(sorted(options))}; known: bands"
            )
        super().__init__(seed=seed)
        self.bands = bands

    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterable[int]:
        """Not available: the widget is driven by key presses, not pulled by the engine.

        Raises:
            ConfigError: always, explaining how to label with the widget, the web page or
                the terminal.
        """
        raise ConfigError(
            "the widget annotator answers in a Jupyter notebook: build the engine there and "
            "run `from anneal_geo.labelling.widget import LabellingWidget; "
            "LabellingWidget(engine).show()`; elsewhere use `anneal-geo label SESSION --web` "
            "or `anneal-geo label SESSION` in a terminal"
        )
