"""Labelling pairs by hand in Jupyter: :class:`LabellingWidget` and the ``widget`` annotator.

The widget is event-driven: nothing waits for a person. Each button click runs a short
handler that commits the answer to the session's SQLite store (``engine.answer``) and
only then shows the next pair; when a round's pairs are all answered it trains the round
(``engine.finish_round``, a few seconds on the sample; a progress bar and a message show
while it runs) and asks the next round's pairs. The kernel is free between clicks, so
other cells can run while the widget is on screen.

A kernel restart loses nothing: build a new engine on the same session directory and a
new widget; it opens at the next unanswered pair.

Keys: ipywidgets has no keyboard handling of its own and this package adds no front-end
extension, so the widget has a small text box: click into it and type ``y`` (similar),
``n`` (dissimilar), ``s`` (skip) or ``u`` (undo); each letter acts at once. Global
shortcuts without focusing the box would need a JupyterLab extension.

ipywidgets is imported when a widget is built, never when this module is imported, so
listing plugins stays light.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from anneal_geo.annotators.base import DISSIMILAR, SIMILAR, SKIP, Annotator
from anneal_geo.annotators.terminal import ANSWER_WORDS, LabellingCursor, round_summary
from anneal_geo.errors import AnnealError, ConfigError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine

__all__ = ["LabellingWidget", "WidgetAnnotator"]

_PRESET_LABELS = {
    "true": "true colour (B04, B03, B02)",
    "false": "false colour (B08, B04, B03)",
}


class WidgetAnnotator(Annotator):
    """A person answers in a Jupyter notebook with :class:`LabellingWidget`.

    The widget drives the engine itself (answer, undo, train), event by event, so it does
    not fit the pull-style :meth:`annotate` the engine's ``run()`` uses: that raises a
    ConfigError saying what to do instead. Use this name as a session's annotator when
    the answers come from the widget (it needs no labels, unlike the oracle).

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
        """Not available: the widget is driven by clicks, not pulled by the engine.

        Raises:
            ConfigError: always, explaining how to label with the widget or the terminal.
        """
        raise ConfigError(
            "the widget annotator answers in a Jupyter notebook: build the engine there and "
            "run `from anneal_geo.annotators.widget import LabellingWidget; "
            "LabellingWidget(engine).show()`; in a terminal use `anneal-geo label SESSION`"
        )


class LabellingWidget:
    """Two patches side by side, buttons for similar / dissimilar / skip / undo, counters.

    Args:
        engine: the engine of the session to label.
        bands: picture bands: preset ``"true"`` / ``"false"`` or three band names
            (default: the session's widget annotator option, else true colour).
        size: longer side of each patch picture in pixels.
        annotator: the name recorded with each answer.
        auto_train: train as soon as a round's last pair is answered; with False a
            "Train and continue" button appears instead (time to undo the last answer).

    Attributes:
        commit_ms: milliseconds from each click to its answer being committed to SQLite.
        train_seconds: seconds each round's training (finish_round) kept the widget busy.
        last_record: the history record of the last round this widget finished.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bands: str | Sequence[str] | None = None,
        size: int = 256,
        annotator: str = "widget",
        auto_train: bool = True,
    ) -> None:
        import ipywidgets as w

        from anneal_geo.annotators.render import PatchRenderer, available_presets

        self.engine = engine
        self.cursor = LabellingCursor(engine, annotator)
        if bands is None:
            bands = engine.config.annotator_options.get("bands")
        self.renderer = PatchRenderer(engine.pool, bands, size=size)
        self.auto_train = auto_train
        self.current: tuple[int, int] | None = None
        self.commit_ms: list[float] = []
        self.train_seconds: list[float] = []
        self.last_record: dict[str, Any] | None = None

        self.title = w.HTML()
        self.status = w.HTML()
        self.message = w.HTML()
        self.left_image = w.Image(format="png")
        self.right_image = w.Image(format="png")
        self.left_caption = w.HTML()
        self.right_caption = w.HTML()
        self.similar_button = w.Button(
            description="Similar", button_style="success", icon="check", tooltip="similar (y)"
        )
        self.dissimilar_button = w.Button(
            description="Dissimilar", button_style="danger", icon="times", tooltip="dissimilar (n)"
        )
        self.skip_button = w.Button(description="Skip", icon="forward", tooltip="skip (s)")
        self.undo_button = w.Button(
            description="Undo", button_style="warning", icon="undo", tooltip="undo (u)"
        )
        self.train_button = w.Button(
            description="Train and continue",
            button_style="primary",
            layout=w.Layout(display="none"),
        )
        self.keys = w.Text(
            value="",
            placeholder="type y n s u",
            description="Keys:",
            continuous_update=True,
            layout=w.Layout(width="190px"),
        )
        options = [(_PRESET_LABELS[p], p) for p in available_presets(engine.pool.bands)]
        if not options:  # no Sentinel-2 colour bands: the renderer shows the first bands
            options = [("first three bands", "true")]
        if bands is None:
            chosen = options[0][1]
        else:
            chosen = bands if isinstance(bands, str) else ",".join(bands)
            if chosen not in [value for _, value in options]:
                options.append((chosen, chosen))
        self.bands_menu = w.Dropdown(
            options=options,
            value=chosen,
            description="Bands:",
            layout=w.Layout(width="320px"),
        )
        self.busy = w.IntProgress(
            value=1,
            min=0,
            max=1,
            bar_style="info",
            description="training",
            layout=w.Layout(display="none"),
        )
        self.log = w.Output()

        self.answer_buttons = (self.similar_button, self.dissimilar_button, self.skip_button)
        for button, value in zip(self.answer_buttons, (SIMILAR, DISSIMILAR, SKIP), strict=True):
            button.on_click(self._handler(partial(self._answer, value)))
        self.undo_button.on_click(self._handler(self._undo))
        self.train_button.on_click(self._handler(self._train))
        self.keys.observe(self._on_keys, names="value")
        self.bands_menu.observe(self._on_bands, names="value")

        def column(image: Any, caption: Any) -> Any:
            return w.VBox([image, caption], layout=w.Layout(margin="0 12px 0 0"))

        self.box = w.VBox(
            [
                self.title,
                w.HBox(
                    [
                        column(self.left_image, self.left_caption),
                        column(self.right_image, self.right_caption),
                    ]
                ),
                w.HBox([*self.answer_buttons, self.undo_button, self.train_button]),
                w.HBox([self.keys, self.bands_menu]),
                self.status,
                self.busy,
                self.message,
                self.log,
            ]
        )
        self.refresh()

    # -- display ----------------------------------------------------------------------------
    def show(self) -> Any:
        """The widget's box; the last expression of a notebook cell, it is displayed."""
        return self.box

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)

    def _handler(self, action: Callable[[], None]) -> Callable[..., None]:
        """A click handler that shows anneal-geo errors as a message instead of losing them.

        ipywidgets sends exceptions from handlers to the browser's log, where nobody looks;
        other exceptions go to the widget's output area (with a traceback) in a kernel.
        """

        def handle(_button: Any = None) -> None:
            with self.log:
                try:
                    action()
                except AnnealError as exc:
                    self._say(f"error: {exc}", error=True)

        return handle

    def _say(self, text: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "#333"
        self.message.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    def _enable(self, answering: bool) -> None:
        for button in self.answer_buttons:
            button.disabled = not answering
        self.keys.disabled = self.cursor.done
        self.undo_button.disabled = not self.cursor.can_undo()

    def _caption(self, patch_id: int) -> str:
        place = html.escape(self.renderer.place(patch_id))
        size = html.escape(self.renderer.size_text())
        return f"<b>patch {patch_id}</b><br>{place}<br>{size}"

    def _render(self) -> None:
        if self.current is None:
            return
        i, j = self.current
        self.left_image.value = self.renderer.patch_png(i)
        self.right_image.value = self.renderer.patch_png(j)
        self.left_caption.value = self._caption(i)
        self.right_caption.value = self._caption(j)

    def _update_status(self) -> None:
        p = self.cursor.progress()
        if self.cursor.done:
            self.status.value = (
                f"all {p.total_rounds} rounds done · budget used {p.budget_used} of "
                f"{p.budget_total} pairs"
            )
            return
        self.status.value = (
            f"<b>{p.left_in_round}</b> pairs left in this round (of {p.round_pairs}) · "
            f"budget used <b>{p.budget_used}</b> of {p.budget_total} pairs"
        )

    def refresh(self) -> None:
        """Show the next unanswered pair (training the round first when none is left)."""
        pair = self.cursor.next_pair()
        self.train_button.layout.display = "none"
        if pair is None and self.cursor.done:
            self.current = None
            self.title.value = "<h4>Session complete</h4>"
            self._update_status()
            self._enable(False)
            return
        if pair is None:
            self.current = None
            if self.auto_train:
                self._train()
                return
            p = self.cursor.progress()
            self.title.value = f"<h4>Round {p.round}: all pairs answered</h4>"
            self.train_button.layout.display = None
            self._update_status()
            self._enable(False)
            return
        self.current = pair
        p = self.cursor.progress()
        self.title.value = (
            f"<h4>Round {p.round} of {p.total_rounds - 1}: are these two patches similar?</h4>"
        )
        self._render()
        self._update_status()
        self._enable(True)

    # -- actions ----------------------------------------------------------------------------
    def _answer(self, value: int) -> None:
        if self.current is None:
            return
        i, j = self.current
        if self.cursor.next_pair() != self.current:
            # Another widget or `anneal-geo label` on the same session got there first.
            self._say(f"patches {i} and {j} were answered elsewhere; showing the next pair")
            self.refresh()
            return
        start = time.perf_counter()
        seq = self.cursor.answer(i, j, value)  # committed to SQLite when it returns
        self.commit_ms.append((time.perf_counter() - start) * 1000.0)
        self._say(f"saved answer {seq}: patches {i} and {j} {ANSWER_WORDS[value]}")
        self.refresh()

    def _undo(self) -> None:
        undone = self.cursor.undo()
        if undone is None:
            self._say("nothing to undo in this round (answers of finished rounds are kept)")
            return
        self._say(f"undone: patches {undone[0]} and {undone[1]}; it is asked again")
        self.refresh()

    def _train(self) -> None:
        p = self.cursor.progress()
        labelled = len(self.engine.store.answers()[1])
        self.title.value = f"<h4>Training round {p.round} ...</h4>"
        previous = (
            f" (the last round took {self.train_seconds[-1]:.1f} s)" if self.train_seconds else ""
        )
        self._say(f"training on {labelled} answered pairs and what they imply{previous}")
        self.train_button.layout.display = "none"
        for button in (*self.answer_buttons, self.undo_button):
            button.disabled = True
        self.busy.layout.display = None
        start = time.perf_counter()
        try:
            record = self.cursor.finish_round()
        except AnnealError as exc:
            self._say(f"training failed: {exc}", error=True)
            self.train_button.layout.display = None
            self.undo_button.disabled = not self.cursor.can_undo()
            return
        finally:
            self.busy.layout.display = "none"
        self.train_seconds.append(time.perf_counter() - start)
        self.last_record = record
        self._say(round_summary(record))
        self.refresh()

    def _on_keys(self, change: dict[str, Any]) -> None:
        text = str(change.get("new") or "")
        if not text:
            return
        self.keys.value = ""
        actions: dict[str, Callable[[], None]] = {
            "y": partial(self._answer, SIMILAR),
            "n": partial(self._answer, DISSIMILAR),
            "s": partial(self._answer, SKIP),
            "u": self._undo,
        }
        for char in text.lower():
            action = actions.get(char)
            if action is not None:
                self._handler(action)()

    def _on_bands(self, change: dict[str, Any]) -> None:
        def switch() -> None:
            self.renderer.set_bands(change["new"])
            self._render()

        self._handler(switch)()
