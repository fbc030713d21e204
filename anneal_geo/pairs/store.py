"""PairStore: every answer to "are these two patches similar?", append-only in SQLite.

The store is an event log. An answer is one row; undoing it appends another row that points
at it (``undoes``); no row is ever updated or deleted, so the file is a full audit trail and
a crash can only lose the row being written, never an acknowledged one. ``add`` commits
(WAL journal, ``synchronous=FULL``) before it returns, which is what lets the engine write
every answer before the next question is asked.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from anneal_geo.errors import SessionError
from anneal_geo.pairs.transitivity import DEFAULT_MAX_IMPLIED, Closure, closure

__all__ = ["ANSWER_NAMES", "SCHEMA_VERSION", "PairStore"]

#: Version of the on-disk schema; bump it (and add a migration) when the tables change.
SCHEMA_VERSION = 1

#: Answer codes as stored, and their names in :meth:`PairStore.count_by_answer`.
ANSWER_NAMES: dict[int, str] = {1: "similar", 0: "dissimilar", -1: "skipped"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    i INTEGER NOT NULL,
    j INTEGER NOT NULL,
    answer INTEGER NOT NULL CHECK (answer IN (-1, 0, 1)),
    annotator TEXT NOT NULL,
    created REAL NOT NULL,
    undoes INTEGER NULL REFERENCES answers(seq),
    CHECK (0 <= i AND i < j)
);
CREATE INDEX IF NOT EXISTS answers_undoes ON answers(undoes);
CREATE INDEX IF NOT EXISTS answers_pair ON answers(i, j);
"""

# Answer rows (not undo rows) that no undo row points at.
_LIVE = """
live AS (
    SELECT seq, round, i, j, answer FROM answers
    WHERE undoes IS NULL
      AND seq NOT IN (SELECT undoes FROM answers WHERE undoes IS NOT NULL)
)
"""

# The latest live answer of each pair: the pair's effective answer.
_EFFECTIVE = (
    "WITH "
    + _LIVE
    + """
, latest AS (SELECT MAX(seq) AS seq FROM live GROUP BY i, j)
SELECT live.seq, live.round, live.i, live.j, live.answer
FROM live JOIN latest ON live.seq = latest.seq
ORDER BY live.seq
"""
)


def _as_id(value: object, name: str) -> int:
    """A patch id as a Python int; ValueError for non-integers and negatives."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"patch id {name}={value!r} must be an integer")
    out = int(value)
    if out < 0:
        raise ValueError(f"patch id {name}={out} must be >= 0")
    return out


class PairStore:
    """Append-only SQLite log of pair answers (1 similar, 0 dissimilar, -1 skipped).

    Patch ids are PatchPool row indices; every pair is stored as ``i < j``. The connection
    stays open for the life of the object and is meant for one thread. Use it as a context
    manager or call :meth:`close`.

    Args:
        path: the SQLite file; created (with its tables) when missing.
        read_only: open an existing file for reading only (``session status``, queries):
            nothing is created or written, and writing raises SessionError. A reader never
            waits for a writer (WAL journal).

    Raises:
        SessionError: the file is not a PairStore this version can read (not SQLite, or a
            newer or unknown ``schema_version``), or ``read_only`` and it does not exist.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = bool(read_only)
        if not self.path.parent.is_dir():
            raise SessionError(
                f"{self.path}: folder {self.path.parent} does not exist; create the session first"
            )
        if self.read_only and not self.path.is_file():
            raise SessionError(f"{self.path} does not exist: the session has no answers store")
        # isolation_level=None: no implicit transactions; each statement commits on its own
        # unless we open one explicitly (undo, schema creation).
        if self.read_only:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
        else:
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._conn: sqlite3.Connection | None = conn
        try:
            if self.read_only:
                self._check_schema(conn)
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: the WAL is fsynced at every commit, so an acknowledged answer
                # survives a power cut too, not only a killed process.
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._init_schema(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._conn = None
            raise SessionError(
                f"{self.path}: not a readable PairStore database ({exc}); "
                "point the session at its annotations.sqlite or move this file away"
            ) from exc
        except SessionError:
            conn.close()
            self._conn = None
            raise

    def _check_schema(self, conn: sqlite3.Connection) -> set[str]:
        """The tables of the file, after checking it is a PairStore of this version."""
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = None if row is None else row[0]
            if found != str(SCHEMA_VERSION):
                raise SessionError(
                    f"{self.path}: PairStore schema_version {found!r} is not supported "
                    f"(this anneal-geo reads version {SCHEMA_VERSION}); "
                    "upgrade anneal-geo or use a new session"
                )
        elif tables - {"sqlite_sequence"}:
            raise SessionError(
                f"{self.path}: SQLite file without a PairStore 'meta' table "
                f"(tables: {', '.join(sorted(tables))}); use a new file for the session"
            )
        elif self.read_only:
            raise SessionError(f"{self.path} holds no PairStore tables (an empty database)")
        return tables

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        # BEGIN IMMEDIATE takes the write lock, so two processes opening a new file at once
        # cannot both create the schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_schema(conn)
            # Statement by statement: executescript() would commit our open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- connection ---------------------------------------------------------------------

    def _writable(self) -> sqlite3.Connection:
        if self.read_only:
            raise SessionError(f"{self.path} is open read-only; open it as a writer to answer")
        return self.conn

    @property
    def conn(self) -> sqlite3.Connection:
        """The open SQLite connection; SessionError after :meth:`close`."""
        if self._conn is None:
            raise SessionError(f"{self.path}: PairStore is closed; open it again")
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent). Every answer is already committed."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"PairStore({str(self.path)!r}, {state})"

    # -- writing ------------------------------------------------------------------------

    def add(self, i: int, j: int, answer: int, *, round: int, annotator: str) -> int:
        """Record one answer and commit it before returning.

        Args:
            i: a patch id (PatchPool row index).
            j: the other patch id; the pair is stored as (min, max).
            answer: 1 similar, 0 dissimilar, -1 skipped.
            round: the active-learning round the question was asked in (>= 0).
            annotator: who answered (e.g. ``"oracle"``, a user name).

        Returns:
            The answer's sequence number (increasing, never reused).

        Raises:
            ValueError: i == j, a negative or non-integer id, an answer outside {-1, 0, 1}
                or a negative round.
        """
        a, b = _as_id(i, "i"), _as_id(j, "j")
        if a == b:
            raise ValueError(f"a pair needs two different patches, got i = j = {a}")
        if a > b:
            a, b = b, a
        if isinstance(answer, bool) or not isinstance(answer, int | np.integer):
            raise ValueError(f"answer {answer!r} must be 1 (similar), 0 (dissimilar) or -1")
        code = int(answer)
        if code not in ANSWER_NAMES:
            raise ValueError(f"answer {code} must be 1 (similar), 0 (dissimilar) or -1 (skip)")
        if isinstance(round, bool) or not isinstance(round, int | np.integer) or round < 0:
            raise ValueError(f"round {round!r} must be an integer >= 0")
        # A single INSERT in autocommit mode is its own transaction: committed (and, with
        # synchronous=FULL, fsynced) when execute() returns.
        cur = self._writable().execute(
            "INSERT INTO answers (round, i, j, answer, annotator, created, undoes) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (int(round), a, b, code, str(annotator), time.time()),
        )
        seq = cur.lastrowid
        assert seq is not None  # an INSERT always sets it
        return int(seq)

    def undo(self, *, annotator: str = "undo") -> tuple[int, int] | None:
        """Undo the latest answer that is still in effect, by appending an undo event.

        Repeated calls walk back through the answers, newest first. The undo row repeats
        the undone row's pair, round and answer and points at it through ``undoes``.

        Args:
            annotator: who undid it, recorded on the undo row.

        Returns:
            The pair (i, j) whose answer was undone, or None when there is nothing to undo.
        """
        conn = self._writable()
        # IMMEDIATE: the read and the append happen under one write lock, so two writers
        # cannot undo the same answer twice.
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "WITH " + _LIVE + " SELECT seq, round, i, j, answer FROM live "
                "ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None
            seq, rnd, i, j, answer = row
            conn.execute(
                "INSERT INTO answers (round, i, j, answer, annotator, created, undoes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rnd, i, j, answer, str(annotator), time.time(), seq),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(i), int(j)

    def set_meta(self, key: str, value: str) -> None:
        """Store a session-level setting (committed at once); ``schema_version`` is reserved."""
        if key == "schema_version":
            raise ValueError("meta key 'schema_version' is managed by PairStore itself")
        self._writable().execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (str(key), str(value))
        )

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A stored setting, or ``default`` when the key was never set."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (str(key),)).fetchone()
        return default if row is None else str(row[0])

    # -- reading ------------------------------------------------------------------------

    def _effective(self) -> np.ndarray:
        """(M, 5) int64 rows seq, round, i, j, answer of each pair's effective answer."""
        rows = self.conn.execute(_EFFECTIVE).fetchall()
        return np.asarray(rows, dtype=np.int64).reshape(-1, 5)

    def answers(self, include_skipped: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The effective answer of every answered pair, in the order they were given.

        A pair's effective answer is its latest answer that was not undone; if that answer
        is a skip, the pair counts as unlabelled (and is left out unless ``include_skipped``).

        Returns:
            pairs (M, 2) int64 with ``pairs[:, 0] < pairs[:, 1]``, labels (M,) int8
            (1, 0, and -1 only with ``include_skipped``), rounds (M,) int64.
        """
        rows = self._effective()
        if not include_skipped:
            rows = rows[rows[:, 4] != -1]
        pairs = np.ascontiguousarray(rows[:, 2:4])
        return pairs, rows[:, 4].astype(np.int8), np.ascontiguousarray(rows[:, 1])

    def queried(self) -> np.ndarray:
        """Every pair ever asked and not undone, skipped ones included.

        The engine excludes these from the candidates, so a skipped pair is not asked again.

        Returns:
            (M, 2) int64, unique pairs with ``i < j``, in the order they were first answered.
        """
        return np.ascontiguousarray(self._effective()[:, 2:4])

    def labelled_pairs(
        self,
        n: int | None = None,
        *,
        max_implied: int = DEFAULT_MAX_IMPLIED,
        seed: int | np.random.Generator = 0,
    ) -> Closure:
        """The training set L: effective similar/dissimilar answers plus what they imply.

        Args:
            n: pool size (patch ids must be below it); default: largest id + 1.
            max_implied: cap on implied pairs (see :func:`~anneal_geo.pairs.closure`).
            seed: seed or generator of the subset kept beyond the cap.

        Returns:
            The :class:`~anneal_geo.pairs.transitivity.Closure` of the answers.
        """
        pairs, labels, _ = self.answers()
        return closure(pairs, labels, n, max_implied=max_implied, seed=seed)

    def count_by_answer(self) -> dict[str, int]:
        """Number of pairs whose effective answer is similar, dissimilar and skipped."""
        counts = dict.fromkeys(ANSWER_NAMES.values(), 0)
        codes, freq = np.unique(self._effective()[:, 4], return_counts=True)
        for code, count in zip(codes.tolist(), freq.tolist(), strict=True):
            counts[ANSWER_NAMES[int(code)]] = int(count)
        return counts

    def log_counts(self) -> dict[str, int]:
        """Rows of the log: ``answers`` given (undone ones included) and ``undos``."""
        answers, undos = self.conn.execute(
            "SELECT COUNT(*) - COUNT(undoes), COUNT(undoes) FROM answers"
        ).fetchone()
        return {"answers": int(answers), "undos": int(undos)}

    def last_round(self) -> int | None:
        """The highest round with an answer in effect (skips count), None when there is none."""
        row = self.conn.execute("WITH " + _LIVE + " SELECT MAX(round) FROM live").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def __len__(self) -> int:
        """Number of pairs queried and not undone (skipped ones included)."""
        row = self.conn.execute(
            "WITH " + _LIVE + " SELECT COUNT(*) FROM (SELECT DISTINCT i, j FROM live)"
        ).fetchone()
        return int(row[0])
