"""The labeller in Jupyter: :class:`LabellingWidget`, an anywidget on the labelling controller.

The widget's front end is the web labeller's own module (``static/labeller.js`` and
``static/app.css``, loaded by anywidget as the widget's ``_esm`` and ``_css``): the same
look and the same keys (``y``/``→`` similar, ``n``/``←`` dissimilar, ``s`` skip,
``u``/Backspace undo, ``?`` help). Keys work while the widget has the focus: its root
element takes the focus (``tabindex``) when it is shown or clicked, and it tells
JupyterLab not to run notebook shortcuts for keys typed there
(``data-lm-suppress-shortcuts``). No text box and no JupyterLab extension are needed;
anywidget's front end comes with the ``anywidget`` package.

How the two halves talk: the front end sends custom messages ``{"id": n, "action": ...}``
(``hello``, ``answer`` with ``value`` and ``pair``, ``undo`` with ``pair``, ``train``,
``image``, ``locator``, ``neighbours``) and gets a reply ``{"reply": n, ...}`` (pictures
as binary buffers). Every message is handled by the same
:class:`~anneal_geo.labelling.controller.LabellingController` as the web page, so an
answer is committed to SQLite before the reply (and the next pair) goes back. The state
the page shows is also a synced trait (``state``), so answers given from Python
(:meth:`LabellingWidget.answer`) show up in the widget too.

Training a finished round runs in the message handler (a few seconds on the sample); the
state switches to the training phase first, so the widget shows its progress bar, and
back once the next round's pairs are chosen.

Threads: the engine's SQLite connection may only be used on the thread that built the
engine. Kernels that deliver widget messages on a thread of their own (ipykernel 7 with
JupyterLab 4.4 and later: "subshells") would make every answer fail there, so the widget
hands each message that touches the session back to the event loop of the thread that
built it (pictures are rendered at once, on any thread).

A kernel restart loses nothing: build a new engine on the same session directory and a
new widget; it opens at the next unanswered pair.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from anneal_geo.annotators.base import DISSIMILAR, SIMILAR, SKIP
from anneal_geo.errors import AnnealError
from anneal_geo.labelling.controller import (
    LabellingConflict,
    LabellingController,
    training_state,
)

if TYPE_CHECKING:
    from anneal_geo.annotators.render import PatchRenderer
    from anneal_geo.engine import Engine

__all__ = ["LabellingWidget"]

_STATIC = Path(__file__).resolve().parent / "static"
_WORDS = {SIMILAR: "similar", DISSIMILAR: "dissimilar", SKIP: "skip"}
#: Messages answered from the pool's pictures and embeddings alone (any thread may).
_ANY_THREAD = frozenset({"image", "locator"})


class LabellingWidget(anywidget.AnyWidget):
    """Two patches side by side, keys and buttons for similar / dissimilar / skip / undo.

    Args:
        engine: the engine of the session to label (it holds the session's lock).
        bands: picture bands: preset ``"true"`` / ``"false"`` or three band names
            (default: the session's annotator option ``bands``, else true colour).
        size: longer side of each enlarged patch picture in pixels (PNG files).
        annotator: the name recorded with each answer.
        auto_train: train as soon as a round's last pair is answered; with False the
            widget shows "Train and continue" instead (time to undo the last answer).

    Attributes:
        controller: the labelling controller (shared logic with the web page).
        commit_ms: milliseconds from each answer message to its commit to SQLite.
        train_seconds: seconds each round's training kept the widget busy.
        last_record: the history record of the last round this widget finished.
    """

    _esm = _STATIC / "labeller.js"
    _css = _STATIC / "app.css"
    state = traitlets.Dict().tag(sync=True)

    def __init__(
        self,
        engine: Engine,
        *,
        bands: str | Sequence[str] | None = None,
        size: int = 256,
        annotator: str = "widget",
        auto_train: bool = True,
    ) -> None:
        super().__init__()
        self.controller = LabellingController(engine, annotator, bands=bands, size=size)
        self.engine = engine
        self.auto_train = bool(auto_train)
        # The engine's SQLite connection belongs to the thread that built it (a notebook's
        # main thread). Recent kernels deliver widget messages on another thread (a
        # "subshell"), so answers are handed back to the event loop of the building thread.
        self._owner = threading.get_ident()
        try:
            self._owner_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._owner_loop = None
        self.on_msg(self._on_message)
        self.refresh()

    # -- what Python code sees -----------------------------------------------------------
    @property
    def current(self) -> tuple[int, int] | None:
        """The pair shown now, or None (round answered, training, or session done)."""
        pair = self.state.get("pair")
        return None if not pair else (int(pair["i"]), int(pair["j"]))

    @property
    def renderer(self) -> PatchRenderer:
        """The renderer of the widget's bands (pool-wide stretch), e.g. for figures."""
        return self.controller.renderer()

    @property
    def commit_ms(self) -> list[float]:
        return self.controller.commit_ms

    @property
    def train_seconds(self) -> list[float]:
        return self.controller.train_seconds

    @property
    def last_record(self) -> dict[str, Any] | None:
        return self.controller.last_record

    @property
    def message(self) -> str:
        """The line the widget shows under the buttons."""
        return str(self.state.get("error") or self.state.get("message") or "")

    def show(self) -> LabellingWidget:
        """The widget itself; as a cell's last expression it is displayed."""
        return self

    def refresh(self, error: str = "", *, train: bool = True) -> None:
        """Show the session's current state (training a finished round first, if due)."""
        state = self.controller.state()
        if error:
            state["error"] = error
        self.state = state
        if train and self._training_due():
            self._train()

    def _training_due(self) -> bool:
        return self.auto_train and self.state.get("phase") == "round_complete"

    # -- actions, as the front end sends them ---------------------------------------------
    def answer(self, value: int | str) -> dict[str, Any]:
        """Answer the shown pair from Python, as a key press would (1/0/-1 or a word)."""
        word = value if isinstance(value, str) else _WORDS.get(int(value), str(value))
        pair = self.current
        return self.handle({"action": "answer", "value": word, "pair": pair and list(pair)})

    def undo(self) -> dict[str, Any]:
        """Undo the latest answer of the round, as the ``u`` key would."""
        return self.handle({"action": "undo", "pair": self.state.get("undo")})

    def train(self) -> dict[str, Any]:
        """Train the answered round (when ``auto_train`` is off), as the ``t`` key would."""
        return self.handle({"action": "train"})

    def handle(self, content: dict[str, Any], buffers: list[Any] | None = None) -> dict[str, Any]:
        """Handle one message from the front end; return the reply (without buffers).

        Replies go to the front end when the message carries an ``id``.
        """
        reply, out = self._dispatch(content)
        if content.get("id") is not None:
            self.send({"reply": content["id"], **reply}, out or None)
        # The answer that ends a round is acknowledged first; then the round trains while
        # the widget shows its progress.
        if self.state.get("phase") == "training":
            self._train()
        return reply

    def _on_message(self, _widget: Any, content: Any, buffers: list[Any]) -> None:
        if not isinstance(content, dict):
            return
        loop = self._owner_loop
        on_owner = threading.get_ident() == self._owner
        if on_owner or loop is None or loop.is_closed() or content.get("action") in _ANY_THREAD:
            self.handle(content, buffers)
            return
        # In order, on the engine's thread; the reply is sent from there.
        loop.call_soon_threadsafe(self.handle, content, buffers)

    def _dispatch(self, content: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        action = content.get("action")
        controller = self.controller
        try:
            if action == "hello":
                self.refresh(train=False)
                return {"ok": True, "state": self.state}, []
            if action == "answer":
                start = time.perf_counter()
                done = controller.answer(content.get("value", ""), pair=content.get("pair"))
                ms = (time.perf_counter() - start) * 1000.0
                self.refresh(train=False)
                if self._training_due():
                    self._show_training()
                return {
                    "ok": True,
                    "seq": done.seq,
                    "repeated": done.repeated,
                    "saved": [done.i, done.j, done.value],
                    "commit_ms": round(ms, 3),
                    "state": self.state,
                }, []
            if action == "undo":
                undone = controller.undo(pair=content.get("pair"))
                self.refresh(train=False)
                return {"ok": True, "undone": undone and list(undone), "state": self.state}, []
            if action == "train":
                if controller.round_complete:
                    self._train()
                return {"ok": True, "state": self.state}, []
            if action == "image":
                png = controller.patch_png(int(content["patch"]), content.get("bands") or None)
                return {"ok": True}, [png]
            if action == "locator":
                i, j = (int(v) for v in content["pair"])
                jpeg = controller.locator_jpeg(i, j)
                return ({"ok": True}, [jpeg]) if jpeg else ({"ok": False}, [])
            if action == "neighbours":
                ids = controller.neighbours(int(content["patch"]), int(content.get("k", 4)))
                return {"ok": True, "ids": ids}, []
        except LabellingConflict as exc:
            self.refresh(train=False)
            return {"ok": False, "conflict": True, "error": str(exc), "state": self.state}, []
        except AnnealError as exc:
            self.refresh(error=str(exc), train=False)
            return {"ok": False, "error": str(exc), "state": self.state}, []
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad message {content!r}: {exc}"}, []
        return {"ok": False, "error": f"unknown action {action!r}"}, []

    def _show_training(self) -> None:
        controller = self.controller
        base = self.state if self.state.get("phase") == "round_complete" else controller.state()
        estimate = controller.training_estimate()
        labelled = int(base["progress"]["budget_used"])
        self.state = training_state(base, controller.engine.rounds_done, 0.0, estimate, labelled)

    def _train(self) -> None:
        controller = self.controller
        if self.state.get("phase") != "training":
            self._show_training()
        try:
            controller.finish_round()
        except AnnealError as exc:
            self.refresh(error=f"training failed: {exc}", train=False)
            return
        self.refresh(train=False)
