"""One writer per session: the advisory lock, tested with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from anneal_geo.errors import SessionError
from anneal_geo.lock import LOCK_FILE, SessionLock, read_holder

HOLD = """
import sys, time
from anneal_geo.lock import SessionLock
lock = SessionLock(sys.argv[1], "anneal-geo label").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(directory: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    child = _holder(tmp_path)
    try:
        with pytest.raises(SessionError) as info:
            SessionLock(tmp_path, "anneal-geo run").acquire()
        message = str(info.value)
        assert "\n" not in message
        assert f"PID {child.pid}" in message and "`anneal-geo label`" in message
        assert "since 20" in message and "session status" in message
    finally:
        child.kill()
        child.wait()


def test_kill_9_of_the_holder_frees_the_session(tmp_path: Path) -> None:
    child = _holder(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # The description file is stale, but the OS released the lock with the process.
    assert (tmp_path / LOCK_FILE).exists()
    with SessionLock(tmp_path, "anneal-geo resume") as lock:
        assert lock.held
        assert read_holder(tmp_path)["pid"] == os.getpid()
        assert read_holder(tmp_path)["command"] == "anneal-geo resume"
    assert not lock.held


def test_two_locks_in_one_process_conflict_and_release_frees(tmp_path: Path) -> None:
    first = SessionLock(tmp_path, "anneal-geo label --web").acquire()
    with pytest.raises(SessionError, match="already open for writing"):
        SessionLock(tmp_path).acquire()
    assert first.acquire() is first  # re-acquiring one's own lock is a no-op
    first.release()
    second = SessionLock(tmp_path).acquire()
    assert second.held
    second.release()


def test_a_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="does not exist"):
        SessionLock(tmp_path / "nope").acquire()
