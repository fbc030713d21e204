"""The Jupyter labelling widget, driven without a browser by clicking its buttons.

A real Engine on a real session over the EuroSAT-MS sample (real SQLite, real training);
answers are given from the class labels, as an expert would.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.annotators.widget import LabellingWidget, WidgetAnnotator
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError
from anneal_geo.session import Session, SessionConfig

pytest.importorskip("ipywidgets")

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"


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


def click_truth(widget: LabellingWidget, pool: PatchPool) -> tuple[int, int, int]:
    """Answer the shown pair from the labels; return (i, j, answer)."""
    assert widget.current is not None
    i, j = widget.current
    labels = pool.single_labels()
    same = int(labels[i] == labels[j])
    (widget.similar_button if same else widget.dissimilar_button).click()
    return i, j, same


def test_answers_land_in_sqlite_in_order_and_skip_is_stored(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine)
        first_round = [tuple(p) for p in engine.round_pairs().tolist()]
        assert widget.current == first_round[0]
        assert widget.left_image.value[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"patch {first_round[0][0]}" in widget.left_caption.value
        assert "°N" in widget.left_caption.value and "640 m" in widget.left_caption.value

        given = []
        for _ in range(3):
            i, j, value = click_truth(widget, pool)
            # Committed before the next pair is shown: another connection sees it already.
            assert rows(session)[-1][2:5] == (i, j, value)
            assert widget.current != (i, j)
            given.append((i, j, value))
        shown = widget.current
        widget.skip_button.click()
        given.append((*shown, -1))

        stored = rows(session)
        assert [(i, j, a) for _, _, i, j, a, _, _ in stored] == given
        assert [tuple(g[:2]) for g in given] == first_round[:4], "pairs asked out of order"
        assert all(r[1] == 0 and r[5] is None and r[6] == "widget" for r in stored)
        assert "<b>6</b> pairs left in this round (of 10)" in widget.status.value
        assert "budget used <b>4</b> of 15" in widget.status.value
        assert len(widget.commit_ms) == 4 and all(ms > 0 for ms in widget.commit_ms)
        # The skipped pair is not asked again in this round.
        assert widget.current == first_round[4]
        assert shown not in [tuple(p) for p in engine.unanswered().tolist()]


def test_undo_asks_the_pair_again_and_only_within_the_round(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine)
        widget.undo_button.click()  # nothing answered yet
        assert rows(session) == []
        assert "nothing to undo" in widget.message.value

        a = click_truth(widget, pool)
        b = click_truth(widget, pool)
        widget.undo_button.click()
        assert widget.current == b[:2], "the undone pair must be asked again, next"
        undo_row = rows(session)[-1]
        assert undo_row[5] == rows(session)[1][0] and undo_row[2:4] == b[:2]

        widget.skip_button.click()  # a different answer for b
        pairs, labels, _ = engine.store.answers(include_skipped=True)
        assert dict(zip(map(tuple, pairs.tolist()), labels.tolist(), strict=True)) == {
            a[:2]: a[2],
            b[:2]: -1,
        }
        widget.undo_button.click()
        widget.undo_button.click()
        assert widget.current == a[:2]
        assert len(engine.store) == 0

        # Keys typed into the key box act like the buttons.
        widget.keys.value = "y"
        assert widget.keys.value == ""
        assert rows(session)[-1][2:5] == (*a[:2], 1)
        widget.keys.value = "u"
        assert widget.current == a[:2] and len(engine.store) == 0

        # A second widget on the same session answers first: the first one does not answer
        # the same pair again but moves on.
        other = LabellingWidget(engine)
        other.dissimilar_button.click()
        count = len(rows(session))
        widget.similar_button.click()
        assert len(rows(session)) == count and "answered elsewhere" in widget.message.value
        assert widget.current == other.current != a[:2]


def test_round_trains_then_moves_on_and_the_session_completes(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        widget = LabellingWidget(engine, auto_train=False)
        for _ in range(10):
            last = click_truth(widget, pool)
        # Round 0 is answered but, without auto_train, not trained: the last answer can
        # still be undone.
        assert widget.current is None and session.history() == []
        assert widget.train_button.layout.display is None
        assert all(b.disabled for b in widget.answer_buttons)
        widget.undo_button.click()
        assert widget.current == last[:2]
        click_truth(widget, pool)
        widget.train_button.click()

        assert len(session.history()) == 1 and len(widget.train_seconds) == 1
        assert widget.last_record is not None and widget.last_record["round"] == 0
        assert "mAP@20" in widget.message.value
        next_round = [tuple(p) for p in engine.round_pairs().tolist()]
        assert session.load_pending()[0] == 1
        assert widget.current == next_round[0]
        assert "Round 1 of 1" in widget.title.value
        before = rows(session)
        widget.undo_button.click()  # round 0 is trained on: kept
        assert rows(session) == before and "nothing to undo" in widget.message.value

        widget.auto_train = True
        for _ in range(5):
            click_truth(widget, pool)
        assert [r["round"] for r in session.history()] == [0, 1]
        assert widget.current is None and "Session complete" in widget.title.value
        assert all(b.disabled for b in widget.answer_buttons) and widget.undo_button.disabled
        widget.similar_button.click()  # ignored: nothing is shown
        assert len(rows(session)) == len(before) + 5
        asked = [(i, j) for _, _, i, j, _, undoes, _ in rows(session) if undoes is None]
        assert len(asked) == 10 + 1 + 5  # one pair answered twice (undo in round 0)
        assert len(set(asked)) == 15


def test_kernel_restart_resumes_at_the_next_unanswered_pair(tmp_path, pool_dir, pool):
    directory = tmp_path / "s"
    session = new_session(directory, pool_dir)
    engine = Engine(session, pool, progress=False)
    widget = LabellingWidget(engine)
    answered = [click_truth(widget, pool)[:2] for _ in range(3)]
    widget.skip_button.click()
    fourth = rows(session)[-1][2:4]
    widget.undo_button.click()
    engine.close()  # the kernel dies here; the widget's objects are gone with it
    del widget

    engine = Engine(Session.open(directory), PatchPool.open(pool_dir), progress=False)
    try:
        widget = LabellingWidget(engine)
        assert widget.current == fourth, "the restarted widget must show the undone pair"
        asked_after = []
        while widget.current is not None and engine.rounds_done == 0:
            asked_after.append(click_truth(widget, pool)[:2])
        assert not set(asked_after) & set(answered), "an answered pair was asked again"
        assert len(asked_after) == 7
        assert len(engine.session.history()) == 1
    finally:
        engine.close()


def test_widget_annotator_is_a_valid_plugin_that_points_at_the_widget(pool):
    cls = plugins.load("annotators", "widget")
    assert issubclass(cls, Annotator) and cls.interactive and not cls.needs_labels
    annotator = plugins.create("annotators", "widget", seed=0)
    answers = annotator.checked_annotate(np.array([[0, 1]]), pool)
    with pytest.raises(ConfigError, match=r"LabellingWidget\(engine\)\.show\(\)"):
        next(iter(answers))
    with pytest.raises(ConfigError, match="unknown option"):
        WidgetAnnotator(colour="red")


def test_importing_the_labelling_modules_is_light():
    code = (
        "import sys, anneal_geo.annotators.widget, anneal_geo.annotators.terminal, "
        "anneal_geo.annotators.render, anneal_geo.cli.label\n"
        "heavy = {'ipywidgets', 'torch', 'faiss', 'rasterio', 'geopandas', 'torchgeo'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
