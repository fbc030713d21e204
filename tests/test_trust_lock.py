"""One writer per session, with real processes: two `anneal-geo label` on one session, readers
while a writer works, the engine's lock in-process, index building."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import SessionError
from anneal_geo.lock import SessionLock, read_holder
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], input=stdin, capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=600,
    )  # fmt: skip


def labelling_session(directory: Path, pool_dir: Path) -> Session:
    config = SessionConfig(
        data=str(pool_dir), annotator="terminal", initial=10, budget=5, rounds=1, epochs=5
    )
    return Session.create(directory, config, {"pool_dir": str(pool_dir)})


def rows(directory: Path) -> int:
    with sqlite3.connect(directory / "annotations.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


def wait_until(condition, what: str, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the labeller ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.2)


def test_a_second_labeller_stops_at_once_and_a_reader_still_works(tmp_path, pool_dir):
    session = labelling_session(tmp_path / "s", pool_dir)
    directory = session.directory
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(
        [str(EXE), "label", str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        # The first labeller holds the lock and shows the round's first pair.
        wait_until(
            lambda: (
                (read_holder(directory) or {}).get("pid") == first.pid
                and session.pending_path.exists()
            ),
            "first question",
            first,
        )
        assert first.stdin is not None
        first.stdin.write("y\n")
        first.stdin.flush()
        wait_until(lambda: rows(directory) == 1, "first answer in SQLite", first)
        before = rows(directory)

        started = time.monotonic()
        second = cli("label", str(directory), stdin="y\nn\ny\nn\n")
        took = time.monotonic() - started
        assert second.returncode == 2, second.stdout + second.stderr
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert message.startswith("error: session ") and "already open for writing" in message
        assert "`anneal-geo label`" in message and f"PID {first.pid}" in message
        assert "since 20" in message and "session status" in message
        assert "Traceback" not in second.stderr
        assert not re.search(r"patches \d+ and \d+", second.stdout)  # it asked nothing
        assert took < 60, f"the second labeller took {took:.0f} s to stop"
        assert rows(directory) == before, "the second labeller stored answers"
        assert len(Session.open(directory).history()) == 0

        status = cli("session", "status", str(directory))
        assert status.returncode == 0, status.stderr
        assert "rounds finished: 0 of 2; next: round 0 of 1" in status.stdout
        assert "answers: 1 answers stand" in status.stdout
    finally:
        if first.poll() is None:
            assert first.stdin is not None
            first.stdin.write("q\n")
            first.stdin.flush()
            try:
                first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                first.kill()
                first.wait()
    # The lock went with the first labeller: labelling continues where it stopped.
    third = cli("label", str(directory), stdin="q\n")
    assert third.returncode == 0, third.stderr
    assert rows(directory) == before


def test_the_engine_holds_the_lock_until_closed(tmp_path, pool_dir, pool):
    config = SessionConfig(data=str(pool_dir), initial=10, budget=5, rounds=1, epochs=5)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False, command="anneal-geo label --web") as engine:
        holder = read_holder(session.directory)
        assert holder is not None and holder["command"] == "anneal-geo label --web"
        assert holder["pid"] == os.getpid()
        # A second engine in this process, and the command line, are refused.
        with pytest.raises(SessionError, match="already open for writing.*engine.close"):
            Engine(Session.open(session.directory), pool, progress=False)
        resumed = cli("resume", str(session.directory))
        assert resumed.returncode == 2
        assert f"PID {os.getpid()}" in resumed.stderr
        assert "`anneal-geo label --web`" in resumed.stderr
        assert len(resumed.stderr.strip().splitlines()) == 1
        indexed = cli("index", str(session.directory))
        assert indexed.returncode == 2 and "already open for writing" in indexed.stderr
        # Readers never wait: status, and an engine opened read-only (writes nothing).
        assert cli("session", "status", str(session.directory)).returncode == 0
        with Engine(Session.open(session.directory), pool, progress=False, read_only=True) as ro:
            assert ro.embeddings.shape == engine.embeddings.shape
            with pytest.raises(SessionError, match="read-only"):
                ro.answer(0, 1, 1)
        engine.run()
    assert len(session.history()) == 2
    # Closed: the next writer gets the lock.
    with SessionLock(session.directory, "anneal-geo resume") as lock:
        assert lock.held


def test_a_failed_engine_gives_the_lock_back(tmp_path, pool_dir, pool):
    config = SessionConfig(data=str(pool_dir), initial=10, budget=5, rounds=1, epochs=5)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    session.config.selector = "nosuch"
    with pytest.raises(Exception, match="unknown selector 'nosuch'"):
        Engine(session, pool, progress=False)
    session.config.selector = "kmeans"
    with Engine(session, PatchPool.open(pool_dir), progress=False) as engine:
        assert engine.rounds_done == 0


def test_a_caller_holding_the_lock_passes_it_to_the_engine(tmp_path, pool_dir, pool):
    config = SessionConfig(data=str(pool_dir), initial=10, budget=5, rounds=0, epochs=5)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    with SessionLock(session.directory, "anneal-geo run") as lock:
        with Engine(session, pool, progress=False, lock=lock) as engine:
            engine.run()
        assert lock.held  # the engine does not release a lock it did not take
        assert read_holder(session.directory)["command"] == "anneal-geo run"


def test_queries_never_wait_for_a_writer(tmp_path, pool_dir, pool):
    from anneal_geo.retrieval.geoindex import GeoIndex, build_index

    config = SessionConfig(data=str(pool_dir), initial=10, budget=5, rounds=1, epochs=5)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        engine.run(1)
    build_index(session.directory)  # a writer: takes and gives back the lock
    image = sorted((ROOT / "sample_tiles" / "eurosat_ms" / "Forest").glob("*.tif"))[0]
    with Engine(Session.open(session.directory), pool, progress=False, command="anneal-geo label"):
        geo = GeoIndex.load(session.directory)
        try:
            assert len(geo.query_patch(3, k=5)) == 5
            assert len(geo.query_image(image, k=5)) == 5  # embeds with a read-only engine
        finally:
            geo.close()
        query = cli("query", str(session.directory), "--patch", "3", "-k", "3")
        assert query.returncode == 0, query.stderr
