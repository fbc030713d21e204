"""PairStore: a real SQLite file, durability across connections and a killed process."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from anneal_geo.errors import SessionError
from anneal_geo.pairs.store import SCHEMA_VERSION, PairStore

REPO = Path(__file__).resolve().parents[1]


def raw_rows(path: Path) -> list[tuple]:
    """Every row of the answers table, read through a separate plain sqlite3 connection."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM answers ORDER BY seq").fetchall()


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "annotations.sqlite"
    with PairStore(path) as store:
        seqs = [
            store.add(3, 1, 1, round=0, annotator="ann"),
            store.add(2, 7, 0, round=0, annotator="ann"),
            store.add(np.int64(9), np.int32(4), -1, round=1, annotator="ann"),
            store.add(5, 6, 1, round=2, annotator="bob"),
        ]
        store.set_meta("pool", "abc123")
    assert seqs == sorted(seqs) and len(set(seqs)) == 4

    with PairStore(path) as store:
        pairs, labels, rounds = store.answers()
        assert pairs.dtype == np.int64 and labels.dtype == np.int8 and rounds.dtype == np.int64
        assert pairs.tolist() == [[1, 3], [2, 7], [5, 6]]
        assert labels.tolist() == [1, 0, 1]
        assert rounds.tolist() == [0, 0, 2]
        pairs, labels, rounds = store.answers(include_skipped=True)
        assert pairs.tolist() == [[1, 3], [2, 7], [4, 9], [5, 6]]
        assert labels.tolist() == [1, 0, -1, 1]
        assert store.count_by_answer() == {"similar": 2, "dissimilar": 1, "skipped": 1}
        assert store.last_round() == 2
        assert len(store) == 4
        assert store.get_meta("pool") == "abc123"
        assert store.get_meta("missing") is None
        assert store.get_meta("missing", "x") == "x"
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    rows = raw_rows(path)
    assert [r[-2] > 0 for r in rows] == [True] * 4  # created timestamps
    assert {r[5] for r in rows} == {"ann", "bob"}


def test_pragmas_wal_and_full_sync(tmp_path: Path) -> None:
    with PairStore(tmp_path / "a.sqlite") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_empty_store(tmp_path: Path) -> None:
    with PairStore(tmp_path / "a.sqlite") as store:
        pairs, labels, rounds = store.answers()
        assert pairs.shape == (0, 2) and labels.shape == (0,) and rounds.shape == (0,)
        assert store.queried().shape == (0, 2)
        assert store.count_by_answer() == {"similar": 0, "dissimilar": 0, "skipped": 0}
        assert store.last_round() is None
        assert store.undo() is None
        assert len(store.labelled_pairs()) == 0


@pytest.mark.parametrize(
    ("i", "j", "answer", "rnd"),
    [
        (4, 4, 1, 0),
        (-1, 3, 1, 0),
        (1, -3, 0, 0),
        (1, 2, 2, 0),
        (1, 2, True, 0),
        (1, 2, 1, -1),
        (1.0, 2, 1, 0),
    ],
)
def test_add_rejects_bad_input(
    tmp_path: Path, i: object, j: object, answer: object, rnd: int
) -> None:
    with PairStore(tmp_path / "a.sqlite") as store:
        with pytest.raises(ValueError):
            store.add(i, j, answer, round=rnd, annotator="x")  # type: ignore[arg-type]
        assert raw_rows(store.path) == []


def test_second_connection_sees_committed_answer(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    first = PairStore(path)
    first.add(1, 2, 1, round=0, annotator="a")
    # The first store stays open: the answer must already be committed, not buffered.
    second = PairStore(path)
    assert second.answers()[0].tolist() == [[1, 2]]
    second.add(0, 5, 0, round=0, annotator="b")
    assert first.answers()[0].tolist() == [[1, 2], [0, 5]]
    assert len(raw_rows(path)) == 2
    second.close()
    first.close()


CHILD = """
import sys
from anneal_geo.pairs.store import PairStore

store = PairStore(sys.argv[1])
k = 0
while True:
    seq = store.add(k, k + 1 + k % 7, k % 2, round=k // 10, annotator="child")
    print(k, seq, flush=True)
    k += 1
"""


def test_sigkill_loses_no_acknowledged_answer(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acked: list[tuple[int, int]] = []
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            while len(acked) < 60:
                line = proc.stdout.readline()
                assert line, f"child died: {proc.stderr.read()}"
                k, seq = map(int, line.split())
                acked.append((k, seq))
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the child is still adding
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with PairStore(path) as store:
        pairs, labels, rounds = store.answers()
    got = {
        (int(a), int(b)): (int(y), int(r))
        for (a, b), y, r in zip(pairs, labels, rounds, strict=True)
    }
    assert len(got) >= len(acked)
    for k, _ in acked:
        assert got[(k, k + 1 + k % 7)] == (k % 2, k // 10)
    seqs = {row[0] for row in raw_rows(path)}
    assert {seq for _, seq in acked} <= seqs


def test_undo_appends_events_and_walks_back(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    with PairStore(path) as store:
        s1 = store.add(1, 2, 1, round=0, annotator="a")
        s2 = store.add(3, 4, 0, round=0, annotator="a")
        s3 = store.add(2, 1, 0, round=1, annotator="a")  # re-answer (1, 2): latest wins
        assert store.answers()[0].tolist() == [[3, 4], [1, 2]]
        assert store.answers()[1].tolist() == [0, 0]
        before = raw_rows(path)

        assert store.undo(annotator="reviewer") == (1, 2)
        after = raw_rows(path)
        assert after[: len(before)] == before  # nothing updated or deleted
        assert len(after) == len(before) + 1 and after[-1][-1] == s3
        assert after[-1][5] == "reviewer" and after[-1][2:5] == (1, 2, 0)
        pairs, labels, rounds = store.answers()
        assert pairs.tolist() == [[1, 2], [3, 4]] and labels.tolist() == [1, 0]
        assert rounds.tolist() == [0, 0]
        assert store.last_round() == 0

        assert store.undo() == (3, 4)
        assert raw_rows(path)[-1][-1] == s2
        assert store.answers()[0].tolist() == [[1, 2]]
        assert store.undo() == (1, 2)
        assert raw_rows(path)[-1][-1] == s1
        assert store.answers()[0].shape == (0, 2)
        assert store.undo() is None
        assert len(raw_rows(path)) == 6
        # Answers after undos are effective again, and an undone pair may be asked again.
        store.add(1, 2, 0, round=2, annotator="a")
        assert store.answers()[0].tolist() == [[1, 2]]
        assert store.undo() == (1, 2)
        assert store.queried().shape == (0, 2)


def test_skipped_pairs_are_queried_but_not_answers(tmp_path: Path) -> None:
    with PairStore(tmp_path / "a.sqlite") as store:
        store.add(0, 1, 1, round=0, annotator="a")
        store.add(5, 2, -1, round=0, annotator="a")
        store.add(3, 4, 0, round=0, annotator="a")
        assert store.queried().tolist() == [[0, 1], [2, 5], [3, 4]]
        assert store.answers()[0].tolist() == [[0, 1], [3, 4]]
        assert store.count_by_answer()["skipped"] == 1
        assert store.undo() == (3, 4)
        assert store.undo() == (2, 5)  # a skip is undone like any answer
        assert store.queried().tolist() == [[0, 1]]


def test_labelled_pairs_applies_transitivity(tmp_path: Path) -> None:
    with PairStore(tmp_path / "a.sqlite") as store:
        store.add(0, 1, 1, round=0, annotator="a")
        store.add(1, 2, 1, round=0, annotator="a")
        store.add(2, 3, -1, round=0, annotator="a")
        closed = store.labelled_pairs(n=10)
        capped = store.labelled_pairs(max_implied=0)
    assert closed.pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert closed.implied.tolist() == [False, True, False]
    assert closed.n_implied == 1
    assert capped.truncated and capped.n_implied == 0 and capped.n_queried == 2


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "annotations.sqlite"
    PairStore(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SessionError, match=r"annotations\.sqlite.*schema_version '99'"):
        PairStore(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
    with pytest.raises(SessionError, match="schema_version None"):
        PairStore(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all, just some text" * 100)
    with pytest.raises(SessionError, match=r"notes\.sqlite"):
        PairStore(text)
    other = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE things (x INTEGER)")
    with pytest.raises(SessionError, match=r"other\.sqlite.*things"):
        PairStore(other)
    with pytest.raises(SessionError, match="does not exist"):
        PairStore(tmp_path / "missing" / "a.sqlite")


def test_closed_store_and_reserved_meta(tmp_path: Path) -> None:
    store = PairStore(tmp_path / "a.sqlite")
    with pytest.raises(ValueError, match="schema_version"):
        store.set_meta("schema_version", "2")
    store.close()
    store.close()  # idempotent
    with pytest.raises(SessionError, match="closed"):
        store.add(0, 1, 1, round=0, annotator="a")


def test_schema_rejects_invalid_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    PairStore(path).close()
    with closing(sqlite3.connect(path)) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO answers (round, i, j, answer, annotator, created) "
            "VALUES (0, 1, 2, 5, 'x', 0)"
        )
