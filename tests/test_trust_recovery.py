"""Damaged or missing session files: a one-line error naming the file and what to do, or a safe
repair that says what it did; never a traceback, never a silent wrong result.

Real sessions on the EuroSAT-MS sample (the simulated oracle answers), real SQLite, real
files damaged the way a crash, a full disk or a careless copy damages them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, SessionError
from anneal_geo.pairs.store import PairStore
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"
INITIAL, BUDGET = 20, 10


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for part in parts:
        assert part in message, message
    return message


def new_session(directory: Path, pool_dir: Path, rounds: int = 2) -> Session:
    config = SessionConfig(
        data=str(pool_dir), initial=INITIAL, budget=BUDGET, rounds=rounds, epochs=5, seed=1
    )
    session = Session.create(directory, config, {"pool_dir": str(pool_dir)})
    session.on_notice = lambda message: None
    return session


def answers_by_round(directory: Path) -> dict[int, int]:
    with sqlite3.connect(directory / "annotations.sqlite") as db:
        found = db.execute(
            "SELECT round, COUNT(*) FROM answers WHERE undoes IS NULL GROUP BY round"
        ).fetchall()
    return {int(r): int(n) for r, n in found}


@pytest.fixture(scope="module")
def built(tmp_path_factory, pool_dir, pool) -> dict[str, Path]:
    """Two sessions with one seed: ``finished`` (rounds 0 and 1 of 0..2 done, uninterrupted)
    and ``half`` (round 0 done, round 1 chosen and 3 of its pairs answered truthfully)."""
    root = tmp_path_factory.mktemp("recovery")
    session = new_session(root / "finished", pool_dir)
    labels = pool.single_labels()
    with Engine(session, pool, progress=False) as engine:
        engine.run(1)
    shutil.copytree(session.directory, root / "half")
    with Engine(session, pool, progress=False) as engine:
        engine.run(1)
    half = Session.open(root / "half")
    half.on_notice = lambda message: None
    with Engine(half, pool, progress=False) as engine:
        for i, j in engine.round_pairs()[:3].tolist():
            engine.answer(i, j, int(labels[i] == labels[j]))
    return {"finished": session.directory, "half": half.directory}


def copy(built: dict[str, Path], which: str, tmp_path: Path) -> Session:
    """A fresh copy of one of the built sessions, to damage."""
    directory = tmp_path / which
    shutil.copytree(built[which], directory)
    session = Session.open(directory)
    session.on_notice = lambda message: None
    return session


# -- history.jsonl ---------------------------------------------------------------------------


def test_a_half_written_history_line_is_cut_off_and_no_pair_is_asked_twice(built, tmp_path):
    session = copy(built, "finished", tmp_path)
    lines = session.history_path.read_bytes().splitlines(keepends=True)
    # The process died while appending round 1's record: half of it is on disk.
    session.history_path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    assert not session.pending_path.exists()

    result = cli("resume", str(session.directory))
    assert result.returncode == 0, result.stderr
    assert "half-written record" in result.stderr and "history.jsonl" in result.stderr
    history = Session.open(session.directory).history()
    assert [h["round"] for h in history] == [0, 1, 2]
    # Round 1 was finished again from its saved answers: no pair beyond the budget.
    assert answers_by_round(session.directory) == {0: INITIAL, 1: BUDGET, 2: BUDGET}
    assert history[-1]["queried_pairs"] + history[-1]["skipped_pairs"] == INITIAL + 2 * BUDGET
    for line in session.history_path.read_text().splitlines():
        json.loads(line)  # every line is a whole record again


def test_a_damaged_history_line_in_the_middle_is_an_error(built, tmp_path):
    session = copy(built, "finished", tmp_path)
    lines = session.history_path.read_text().splitlines()
    session.history_path.write_text(lines[0][:40] + "\n" + lines[1] + "\n")
    with pytest.raises(SessionError, match="history.jsonl line 1 is damaged"):
        session.history()


# -- annotations.sqlite ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["emptied", "deleted", "replaced"])
def test_a_lost_answer_store_is_an_error_naming_the_answers_it_had(built, tmp_path, damage):
    session = copy(built, "finished", tmp_path)
    store = session.store_path
    for extra in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        extra.unlink(missing_ok=True)
    if damage == "emptied":
        store.write_bytes(b"")
        expected = "is empty (0 bytes) but the session had 30 answers after 2 finished rounds"
    elif damage == "deleted":
        store.unlink()
        expected = "is missing but the session had 30 answers after 2 finished rounds"
    else:
        store.unlink()
        with PairStore(store) as fresh:  # another, younger store copied over it
            fresh.add(0, 1, 1, round=0, annotator="oracle")
        expected = "holds 1 answers but the session had 30 after round 1"
    history = session.history_path.read_text()

    commands = ("resume", "label") if damage == "emptied" else ("resume",)
    for command in commands:
        one_line_error(cli(command, str(session.directory)), str(store), expected)
    # Nothing was written: the store was not recreated, no round was run.
    assert store.exists() == (damage != "deleted")
    if damage == "emptied":
        assert store.stat().st_size == 0
    assert session.history_path.read_text() == history
    assert not session.pending_path.exists()


# -- pending.json ----------------------------------------------------------------------------


def test_a_deleted_pending_round_is_completed_within_its_budget(built, tmp_path, pool):
    session = copy(built, "half", tmp_path)
    session.pending_path.unlink()
    notices: list[str] = []
    session.on_notice = notices.append
    with Engine(session, pool, progress=False) as engine:
        engine.run(1)
    assert answers_by_round(session.directory) == {0: INITIAL, 1: BUDGET}
    assert any("pending.json was missing" in n and "3 answers" in n for n in notices), notices
    record = session.history()[-1]
    assert record["round"] == 1 and record["round_pairs"] == BUDGET
    assert record["recovered_answers"] == 3


DAMAGED_PENDING = {
    "truncated": (b'{"round": 1, "pairs": [[3, 4], [5,', "not readable JSON"),
    "random-bytes": (bytes(range(256)) * 4, "not readable JSON"),
    "out-of-range": (b'{"round": 1, "pairs": [[3, 4], [5, 99999]]}', "(5, 99999) is not a pair"),
    "same-patch": (b'{"round": 1, "pairs": [[3, 3]]}', "(3, 3) is not a pair"),
    "wrong-round": (b'{"round": "one", "pairs": []}', "is not a round number"),
    "no-pairs": (b'{"round": 1}', "no 'round' and 'pairs'"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_PENDING))
def test_a_damaged_pending_round_is_an_error_naming_the_file(built, tmp_path, pool, damage):
    session = copy(built, "half", tmp_path)
    content, why = DAMAGED_PENDING[damage]
    session.pending_path.write_bytes(content)
    with pytest.raises(SessionError) as info:
        session.load_pending(len(pool))
    message = str(info.value)
    assert message.startswith(f"{session.pending_path} is damaged") and why in message
    assert "delete it" in message and "\n" not in message


def test_a_damaged_pending_round_stops_resume_with_one_line(built, tmp_path):
    session = copy(built, "half", tmp_path)
    session.pending_path.write_bytes(DAMAGED_PENDING["truncated"][0])
    one_line_error(cli("resume", str(session.directory)), f"{session.pending_path} is damaged")
    assert answers_by_round(session.directory) == {0: INITIAL, 1: 3}


@pytest.mark.slow
def test_deleting_a_damaged_pending_round_as_told_is_safe(built, tmp_path):
    session = copy(built, "half", tmp_path)
    session.pending_path.write_bytes(DAMAGED_PENDING["random-bytes"][0])
    assert "delete it" in cli("resume", str(session.directory)).stderr
    session.pending_path.unlink()
    assert cli("resume", str(session.directory)).returncode == 0
    assert answers_by_round(session.directory) == {0: INITIAL, 1: BUDGET, 2: BUDGET}


# -- session.toml ----------------------------------------------------------------------------


def _wrong_value(tp: typing.Any) -> typing.Any:
    """A value of the wrong type for a setting of type ``tp``."""
    text = str(tp)
    if text in ("str", "<class 'str'>"):
        return 5
    if "dict" in text:
        return "not a table"
    return "4"  # numbers, booleans, lists, optional lists: a string is wrong for each


def test_every_setting_is_type_checked_when_session_toml_is_read(tmp_path, pool_dir):
    """Every field of SessionConfig, whatever fields it has now or gets later."""
    session = new_session(tmp_path / "s", pool_dir)
    document = session.toml_path.read_text()
    hints = typing.get_type_hints(SessionConfig)
    for item in dataclasses.fields(SessionConfig):
        data = tomllib.loads(document)
        bad = _wrong_value(hints[item.name])
        if item.name.endswith("_options"):
            data[item.name] = bad
        else:
            data["settings"][item.name] = bad
        session.toml_path.write_text(tomli_w.dumps(data))
        with pytest.raises(ConfigError) as info:
            Session.open(session.directory)
        message = str(info.value)
        assert f"setting '{item.name}' must be" in message and "\n" not in message, message
        assert str(session.toml_path) in message
    session.toml_path.write_text(document)
    assert Session.open(session.directory).config == session.config


def test_a_wrongly_typed_or_out_of_range_setting_is_one_line_from_every_command(tmp_path, pool_dir):
    session = new_session(tmp_path / "s", pool_dir)
    text = session.toml_path.read_text()
    session.toml_path.write_text(text.replace(f"budget = {BUDGET}", 'budget = "4"'))
    for command in (("resume",), ("label",), ("session", "status")):
        one_line_error(
            cli(*command, str(session.directory)),
            "session.toml: setting 'budget' must be an integer, got '4' (text)",
        )
    margin = f"margin = {session.config.margin}"
    assert margin in text
    session.toml_path.write_text(text.replace(margin, "margin = -1.0"))
    with pytest.raises(ConfigError, match="setting 'margin' must be positive, got -1.0"):
        Session.open(session.directory)
    session.toml_path.write_text(text.replace(margin, "margin = 1"))
    assert Session.open(session.directory).config.margin == 1.0  # an integer is a number


# -- the trunk-feature cache ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape"])
def test_a_damaged_feature_cache_is_rebuilt_with_a_message(built, tmp_path, pool, damage):
    session = copy(built, "finished", tmp_path)
    (cache,) = session.directory.glob("trunk_features_*.npy")
    good = np.load(cache)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:
        np.save(cache, good[:10])
    notices: list[str] = []
    session.on_notice = notices.append
    with Engine(session, pool, progress=False) as engine:
        assert engine.rounds_done == 2
    assert any(str(cache) in n and "computing the trunk features again" in n for n in notices)
    np.testing.assert_array_equal(np.load(cache), good)
    assert not list(session.directory.glob("*.partial"))


# -- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "not-a-state"])
def test_a_damaged_checkpoint_is_an_error_naming_it(built, tmp_path, pool, damage):
    import torch

    session = copy(built, "finished", tmp_path)
    latest = session.checkpoint_path(1)
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:200])
    elif damage == "random-bytes":
        latest.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"weights": torch.zeros(3)}, latest)
    with pytest.raises(SessionError) as info:
        Engine(session, pool, progress=False)
    message = str(info.value)
    assert message.startswith(f"{latest} is damaged") and "delete it" in message
    assert "\n" not in message


def test_a_damaged_checkpoint_stops_resume_with_one_line(built, tmp_path):
    session = copy(built, "finished", tmp_path)
    latest = session.checkpoint_path(1)
    latest.write_bytes(latest.read_bytes()[:200])
    one_line_error(cli("resume", str(session.directory)), str(latest), "is damaged")


@pytest.mark.slow
def test_deleting_a_damaged_checkpoint_as_told_is_safe(built, tmp_path):
    session = copy(built, "finished", tmp_path)
    latest = session.checkpoint_path(1)
    latest.write_bytes(latest.read_bytes()[:200])
    latest.unlink()  # as the message says: the session resumes from the one before
    assert cli("resume", str(session.directory)).returncode == 0
    assert [h["round"] for h in Session.open(session.directory).history()] == [0, 1, 2]


# -- a resumed round records what an uninterrupted one records --------------------------------


def test_a_resumed_round_records_the_selection_statistics(built, tmp_path, pool):
    resumed = copy(built, "half", tmp_path)
    with Engine(resumed, pool, progress=False) as engine:
        engine.run(1)
    whole = Session.open(built["finished"]).history()[1]
    again = Session.open(resumed.directory).history()[1]
    assert again["resumed"] is True
    selection = (
        "candidates",
        "n_candidates",
        "shortlist",
        "mean_uncertainty_selected",
        "threshold",
        "balanced_accuracy",
    )
    for key in selection:
        assert key in whole, key
        assert again.get(key) == whole[key], key
    timing = {k for k in whole if k.startswith("seconds")}
    assert set(whole) - timing <= set(again)
