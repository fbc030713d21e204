"""One writer per session: an exclusive advisory lock on ``SESSION/session.lock``.

Every command that writes to a session (run, resume, label, the widget, the web labeller,
index building) holds a :class:`SessionLock` while it works. The lock is the operating
system's advisory file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows), not the
existence of a file: the OS releases it when the holder exits, however it exits (``kill -9``
included), so a crash never leaves a session locked. The file's content only describes the
holder (command, PID, host, since when) for the message a second writer gets; a stale
description from a crashed holder is overwritten by the next one.

Readers (``session status``, ``query``) never take the lock and never wait for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from anneal_geo.errors import SessionError

__all__ = ["LOCK_FILE", "SessionLock", "describe_holder", "read_holder"]

#: The lock file inside a session directory.
LOCK_FILE = "session.lock"


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another holds it."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def read_holder(directory: str | Path) -> dict[str, Any] | None:
    """The description the last holder wrote (None when there is none or it is unreadable).

    It says who holds the lock only while the lock is actually held; use it for messages.
    """
    try:
        text = (Path(directory) / LOCK_FILE).read_text(encoding="utf-8")
        holder = json.loads(text)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``"`anneal-geo label` (PID 4242 on host, since 2026-12-01 20:15:03)"``."""
    if not holder:
        return "another process"
    since = holder.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
        if isinstance(since, (int, float))
        else "an unknown time"
    )
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    command, pid = holder.get("command", "anneal-geo"), holder.get("pid", "?")
    return f"`{command}` (PID {pid}{where}, since {when})"


class SessionLock:
    """The exclusive writer lock of one session directory.

    Args:
        directory: the session directory (must exist).
        command: what holds it, shown to a second writer, e.g. ``"anneal-geo label"``.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. Acquiring a lock
    that another process (or another :class:`SessionLock` in this process) holds raises a
    one-line :class:`~anneal_geo.errors.SessionError` naming the holder and what to do.
    """

    def __init__(self, directory: str | Path, command: str = "anneal-geo") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> SessionLock:
        """Take the lock, or raise :class:`SessionError` naming the holder."""
        if self._fd is not None:
            return self
        if not self.directory.is_dir():
            raise SessionError(f"{self.directory} is not a session directory (it does not exist)")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SessionError(
                f"cannot open the session lock {self.path}: {exc.strerror}; check the folder's "
                "permissions"
            ) from exc
        if not _try_lock(fd):
            os.close(fd)
            found = read_holder(self.directory)
            holder = describe_holder(found)
            mine = (os.getpid(), socket.gethostname())
            if found and (found.get("pid"), found.get("host")) == mine:
                todo = "close the other engine of this process first (engine.close())"
            else:
                todo = "finish or close that one first"
            raise SessionError(
                f"session {self.directory} is already open for writing by {holder}; {todo} "
                "(`anneal-geo session status` reads it without writing)"
            )
        self._fd = fd
        info = {
            "command": self.command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
        }
        data = (json.dumps(info) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        return self

    def release(self) -> None:
        """Give the lock up (the description stays; it is stale once the lock is free)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> SessionLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lost reference must not keep the session locked
        with contextlib.suppress(Exception):
            self.release()
