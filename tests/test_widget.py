"""The Jupyter labelling widget (anywidget), driven by the messages its front end sends.

A real Engine on a real session over the EuroSAT-MS sample (real SQLite, real training);
answers are given from the class labels, as an expert would. Each test sends the widget the
same custom messages ``labeller.js`` sends on a key press (``{"id", "action", "value",
"pair"}``) through ipywidgets' message path (``_handle_custom_msg``) and reads the replies
the widget sends back.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.annotators.widget import WidgetAnnotator
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError
from anneal_geo.session import Session, SessionConfig

pytest.importorskip("anywidget")

from anneal_geo.labelling.widget import LabellingWidget

STATIC = Path(__file__).resolve().parent.parent / "anneal_geo" / "labelling" / "static"
PNG = b"\x89PNG\r\n\x1a\n"


def new_session(directory: Path, pool_dir: Path, rounds: int = 1) -> Session:
    config = SessionConfig(
        data=str(pool_dir),
        annotator="widget",
        initial=10,
        budget=5,
        rounds=rounds,
        epochs=5,
        seed=1,
    )
    return Session.create(directory, config, {"pool_dir": str(pool_dir)})


def rows(session: Session) -> list[tuple[int, int, int, int, int, int | None, str]]:
    """Every row of the store, read through a separate connection (so: committed)."""
    with sqlite3.connect(session.store_path) as db:
        return db.execute(
            "SELECT seq, round, i, j, answer, undoes, annotator FROM answers ORDER BY seq"
        ).fetchall()


class _Fanout:
    def __init__(self) -> None:
        self.receivers: list[Any] = []

    def __call__(self, content: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        for receive in self.receivers:
            receive(content, buffers)


class FrontEnd:
    """Sends what labeller.js sends and keeps what the widget sends back."""

    views = itertools.count(1)

    def __init__(self, widget: LabellingWidget) -> None:
        self.widget = widget
        self.replies: list[tuple[dict[str, Any], list[bytes] | None]] = []
        self.ids = itertools.count(1)
        self.view = next(self.views)
        # Every view of a widget receives every message (as in a browser).
        previous = widget.send if isinstance(widget.send, _Fanout) else None
        fanout = previous or _Fanout()
        fanout.receivers.append(self._receive)
        widget.send = fanout  # type: ignore[method-assign]

    def _receive(self, content: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        self.replies.append((content, buffers))

    def send(self, action: str, **fields: Any) -> tuple[dict[str, Any], list[bytes] | None]:
        message_id = f"v{self.view}-{next(self.ids)}"
        self.widget._handle_custom_msg({"id": message_id, "action": action, **fields}, [])
        replies = [r for r in self.replies if r[0].get("reply") == message_id]
        assert len(replies) == 1, f"{action}: {len(replies)} replies"
        return replies[0]

    def key(self, word: str) -> dict[str, Any]:
        """A key press for the pair on screen: the answer names that pair."""
        state = self.widget.state
        pair = [state["pair"]["i"], state["pair"]["j"]] if state.get("pair") else None
        return self.send("answer", value=word, pair=pair)[0]

    def truth(self, pool: PatchPool) -> tuple[int, int, int]:
        """Answer the shown pair from the labels; return (i, j, answer)."""
        i, j = self.widget.current or (None, None)
        assert i is not None and j is not None
        labels = pool.single_labels()
        same = int(labels[i] == labels[j])
        reply = self.key("similar" if same else "dissimilar")
        assert reply["ok"] and reply["saved"] == [min(i, j), max(i, j), same], reply
        return i, j, same


def test_key_messages_land_in_sqlite_in_order_and_skip_is_stored(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine)
        front = FrontEnd(widget)
        hello, _ = front.send("hello")
        first_round = [tuple(p) for p in engine.round_pairs().tolist()]
        assert hello["state"]["phase"] == "answering"
        assert widget.current == first_round[0]
        assert [tuple(p) for p in widget.state["upcoming"]] == first_round[1:3]  # prefetched
        place = widget.state["patches"][str(first_round[0][0])]["place"]
        assert re.fullmatch(r"\d+\.\d{4}°[NS] \d+\.\d{4}°[EW]", place)
        assert "640 m" in widget.state["size_text"]

        reply, buffers = front.send("image", patch=first_round[0][0], bands="false")
        assert reply["ok"] and buffers and buffers[0][:8] == PNG

        given = []
        for _ in range(3):
            i, j, value = front.truth(pool)
            # Committed before the reply: another connection sees it already.
            assert rows(session)[-1][2:5] == (i, j, value)
            assert widget.current != (i, j)
            given.append((i, j, value))
        shown = widget.current
        assert shown is not None
        front.key("skip")
        given.append((*shown, -1))

        stored = rows(session)
        assert [(i, j, a) for _, _, i, j, a, _, _ in stored] == given
        assert [tuple(g[:2]) for g in given] == first_round[:4], "pairs asked out of order"
        assert all(r[1] == 0 and r[5] is None and r[6] == "widget" for r in stored)
        progress = widget.state["progress"]
        assert (progress["left_in_round"], progress["round_pairs"]) == (6, 10)
        assert (progress["budget_used"], progress["budget_total"]) == (4, 15)
        assert len(widget.commit_ms) == 4 and all(ms > 0 for ms in widget.commit_ms)
        # The skipped pair is not asked again in this round.
        assert widget.current == first_round[4]
        assert shown not in [tuple(p) for p in engine.unanswered().tolist()]


def test_undo_repeats_and_stale_answers_never_store_twice(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine)
        front = FrontEnd(widget)
        reply, _ = front.send("undo", pair=None)  # nothing answered yet
        assert reply["ok"] and reply["undone"] is None and rows(session) == []
        assert "nothing to undo" in widget.message

        a = front.truth(pool)
        b = front.truth(pool)
        assert widget.state["undo"] == list(b[:2])
        reply, _ = front.send("undo", pair=widget.state["undo"])
        assert reply["undone"] == list(b[:2])
        assert widget.current == b[:2], "the undone pair must be asked again, next"
        undo_row = rows(session)[-1]
        assert undo_row[5] == rows(session)[1][0] and undo_row[2:4] == b[:2]
        # The same undo sent twice (a retried message) undoes nothing more.
        again, _ = front.send("undo", pair=list(b[:2]))
        assert not again["ok"] and again["conflict"] and len(engine.store) == 1

        front.key("skip")  # a different answer for b
        pairs, labels, _ = engine.store.answers(include_skipped=True)
        assert dict(zip(map(tuple, pairs.tolist()), labels.tolist(), strict=True)) == {
            a[:2]: a[2],
            b[:2]: -1,
        }
        count = len(rows(session))
        # The skip repeated for the pair it answered: acknowledged, nothing written.
        repeat, _ = front.send("answer", value="skip", pair=list(b[:2]))
        assert repeat["ok"] and repeat["repeated"] and len(rows(session)) == count
        # An answer for a pair that is not on screen (a stale second view) is refused.
        other_word = "dissimilar" if a[2] == 1 else "similar"
        stale, _ = front.send("answer", value=other_word, pair=list(a[:2]))
        assert not stale["ok"] and stale["conflict"] and len(rows(session)) == count

        # Two views of one model: the second answers first, the first's key press for the
        # same pair is then refused instead of answering the next pair unseen.
        shown = widget.state["pair"]
        other = FrontEnd(widget)
        other.send("answer", value="dissimilar", pair=[shown["i"], shown["j"]])
        late, _ = front.send("answer", value="similar", pair=[shown["i"], shown["j"]])
        assert not late["ok"] and late["conflict"]
        assert len(rows(session)) == count + 1
        assert rows(session)[-1][4] == 0


def test_round_trains_then_moves_on_and_the_session_completes(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine, auto_train=False)
        front = FrontEnd(widget)
        for _ in range(10):
            last = front.truth(pool)
        # Round 0 is answered but, without auto_train, not trained: the last answer can
        # still be undone.
        assert widget.current is None and session.history() == []
        assert widget.state["phase"] == "round_complete"
        assert front.key("similar")["conflict"]  # nothing to answer
        front.send("undo", pair=widget.state["undo"])
        assert widget.current == last[:2]
        front.truth(pool)
        states: list[str] = []
        widget.observe(lambda change: states.append(change["new"]["phase"]), names="state")
        reply, _ = front.send("train")
        assert reply["ok"] and "training" in states, "the widget must show training"

        assert len(session.history()) == 1 and len(widget.train_seconds) == 1
        assert widget.last_record is not None and widget.last_record["round"] == 0
        assert "mAP@20" in widget.message
        next_round = [tuple(p) for p in engine.round_pairs().tolist()]
        assert session.load_pending()[0] == 1
        assert widget.current == next_round[0]
        assert widget.state["progress"]["round"] == 1
        assert widget.state["history"][0]["round"] == 0
        before = rows(session)
        front.send("undo", pair=None)  # round 0 is trained on: kept
        assert rows(session) == before and "nothing to undo" in widget.message

        widget.auto_train = True
        states.clear()
        for _ in range(5):
            front.truth(pool)
        assert "training" in states
        assert [r["round"] for r in session.history()] == [0, 1]
        assert widget.current is None and widget.state["phase"] == "done"
        assert widget.state["undo"] is None
        assert front.key("similar")["conflict"]  # ignored: nothing is shown
        assert len(rows(session)) == len(before) + 5
        asked = [(i, j) for _, _, i, j, _, undoes, _ in rows(session) if undoes is None]
        assert len(asked) == 10 + 1 + 5  # one pair answered twice (undo in round 0)
        assert len(set(asked)) == 15


def test_kernel_restart_resumes_at_the_next_unanswered_pair(tmp_path, pool_dir, pool):
    directory = tmp_path / "s"
    session = new_session(directory, pool_dir)
    engine = Engine(session, pool, progress=False)
    widget = LabellingWidget(engine)
    front = FrontEnd(widget)
    answered = [front.truth(pool)[:2] for _ in range(3)]
    front.key("skip")
    fourth = rows(session)[-1][2:4]
    front.send("undo", pair=list(fourth))
    engine.close()  # the kernel dies here; the widget's objects are gone with it
    widget.close()
    del widget, front

    engine = Engine(Session.open(directory), PatchPool.open(pool_dir), progress=False)
    try:
        widget = LabellingWidget(engine)
        front = FrontEnd(widget)
        assert widget.current == fourth, "the restarted widget must show the undone pair"
        asked_after = []
        while widget.current is not None and engine.rounds_done == 0:
            asked_after.append(front.truth(pool)[:2])
        assert not set(asked_after) & set(answered), "an answered pair was asked again"
        assert len(asked_after) == 7
        assert len(engine.session.history()) == 1
    finally:
        engine.close()


def test_messages_on_another_thread_are_answered_on_the_engines_thread(tmp_path, pool_dir, pool):
    """Recent kernels deliver widget messages on a thread of their own ("subshells"); the
    engine's SQLite connection only works on the thread that built it (a notebook's main
    thread, which runs the kernel's event loop)."""
    session = new_session(tmp_path / "s", pool_dir)

    async def notebook() -> list[dict[str, Any]]:
        with Engine(session, pool, progress=False) as engine:
            widget = LabellingWidget(engine)
            front = FrontEnd(widget)
            shown = widget.current
            assert shown is not None
            done = threading.Event()

            def kernel_thread() -> None:
                widget._handle_custom_msg(
                    {"id": "t-1", "action": "answer", "value": "similar", "pair": list(shown)},
                    [],
                )
                done.set()

            worker = threading.Thread(target=kernel_thread)
            worker.start()
            worker.join(timeout=30)
            assert done.is_set()
            for _ in range(200):  # the event loop runs the handler once we yield to it
                if front.replies:
                    break
                await asyncio.sleep(0.01)
            return [reply for reply, _ in front.replies]

    replies = asyncio.run(notebook())
    assert len(replies) == 1 and replies[0]["ok"], replies
    assert len(rows(session)) == 1 and rows(session)[0][4] == 1


def test_python_answers_and_bad_messages(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine, bands="false")
        assert widget.renderer.band_names == ["B08", "B04", "B03"]
        assert widget.state["bands"]["current"] == "false"
        shown = widget.current
        assert widget.answer(1)["ok"] and rows(session)[-1][2:5] == (*shown, 1)
        assert widget.undo()["undone"] == list(shown)
        front = FrontEnd(widget)
        reply, _ = front.send("fly")
        assert not reply["ok"] and "unknown action" in reply["error"]
        reply, _ = front.send("answer", value="maybe", pair=list(shown))
        assert not reply["ok"] and "must be similar" in reply["error"]
        reply, _ = front.send("image", patch=10_000)
        assert not reply["ok"] and "out of range" in reply["error"]
        reply, _ = front.send("neighbours", patch=5, k=3)
        assert reply["ok"] and len(reply["ids"]) == 3 and 5 not in reply["ids"]
        reply, buffers = front.send("locator", pair=[0, 1])  # EuroSAT: no scene pictures
        assert not reply["ok"] and not buffers
        assert len(rows(session)) == 2


def test_the_widget_is_the_web_page_module_with_keys_and_nothing_remote():
    assert Path(LabellingWidget._esm._path) == STATIC / "labeller.js"  # type: ignore[attr-defined]
    script = (STATIC / "labeller.js").read_text()
    assert "export default" in script and "export function mount" in script
    assert "tabIndex = 0" in script and 'addEventListener("keydown"' in script
    assert "data-lm-suppress-shortcuts" in script
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name


def test_widget_annotator_is_a_valid_plugin_that_points_at_the_widget(pool):
    cls = plugins.load("annotators", "widget")
    assert issubclass(cls, Annotator) and cls.interactive and not cls.needs_labels
    annotator = plugins.create("annotators", "widget", seed=0)
    answers = annotator.checked_annotate(np.array([[0, 1]]), pool)
    with pytest.raises(ConfigError, match=r"LabellingWidget\(engine\)\.show\(\)"):
        next(iter(answers))
    with pytest.raises(ConfigError, match="unknown option"):
        WidgetAnnotator(colour="red")
    from anneal_geo.annotators import widget as old_home

    assert old_home.LabellingWidget is LabellingWidget


def test_importing_the_labelling_modules_is_light():
    code = (
        "import sys, anneal_geo.annotators.widget, anneal_geo.annotators.terminal, "
        "anneal_geo.annotators.render, anneal_geo.cli.label, anneal_geo.labelling, "
        "anneal_geo.labelling.controller, anneal_geo.labelling.web\n"
        "heavy = {'ipywidgets', 'anywidget', 'starlette', 'uvicorn', 'torch', 'faiss', "
        "'rasterio', 'geopandas', 'torchgeo', 'ipyleaflet'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
