"""When the database cannot be written: which SQLite errors mean that, and the fault kept
from a failed write until the database can be written again.

A full disk (``SQLITE_FULL``, or an I/O error on a file system with no space left), a write
lock that another program holds for longer than the writer waits (``SQLITE_BUSY``), an I/O
error or a read-only file become a :class:`~bulkrunner.errors.StoreUnwritable`: HTTP 503 with
``Retry-After``, the request's transaction rolled back, nothing stored. The fault then says
why writes fail (``/healthz`` shows it) until a later write stores something, or a cheap
look finds the cause gone (space freed on the file system, the write lock free again).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from bulkrunner.errors import DatabaseFull, DatabaseLocked, StoreUnwritable

#: Milliseconds a write waits for another connection's write lock before it fails. A
#: request thread waits this long at most (a submission answers 503 after it), and the
#: commits of other bulkrunner processes sharing the file last milliseconds, so a few
#: seconds tell a lock held open by another program from ordinary contention.
BUSY_TIMEOUT_MS = 5000
#: Bytes the write-ahead log is cut back to when it starts over after a checkpoint: a log
#: that grew while a long read (an export) kept it from being checkpointed shrinks again.
WAL_SIZE_LIMIT = 8 * 1024 * 1024

_FULL, _BUSY, _IOERR, _READONLY = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY,
                                   sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY)
#: Free bytes under which an I/O error counts as a full disk (SQLite reports a write cut
#: short by ENOSPC as SQLITE_FULL, but growing the -shm file or an fsync as SQLITE_IOERR).
_LOW_SPACE = 1024 * 1024
#: Seconds between two looks for a released lock (each opens a connection).
_LOCK_LOOK_EVERY = 1.0


def unwritable(e: BaseException, path: str = "") -> StoreUnwritable | None:
    """The :class:`StoreUnwritable` that SQLite error ``e`` stands for, or None when it is
    another error (a bad statement, a constraint). ``path`` is the database file, to tell
    an I/O error on a full file system from another one."""
    if isinstance(e, StoreUnwritable):
        return e
    code = getattr(e, "sqlite_errorcode", None)
    if not isinstance(e, sqlite3.Error) or not isinstance(code, int):
        return None
    name = getattr(e, "sqlite_errorname", "") or str(code)
    primary = code & 0xFF
    details = {"sqlite_error": name}
    if primary == _FULL or (primary == _IOERR and path and _free_bytes(path) < _LOW_SPACE):
        return DatabaseFull(
            "the disk holding the database is full, so nothing of this request was "
            "stored; the server goes on and takes writes again by itself once space is "
            "freed", retry_after=30, details=details)
    if primary == _BUSY:
        return DatabaseLocked(
            "the database is locked by another program (a write transaction held open for "
            f"more than {BUSY_TIMEOUT_MS / 1000:g} s, such as a sqlite3 shell after BEGIN), "
            "so nothing of this request was stored; it takes writes again by itself once "
            "the lock is released", retry_after=5, details=details)
    if primary in (_IOERR, _READONLY):
        return StoreUnwritable(
            f"the database cannot be written ({e}), so nothing of this request was stored; "
            "the server goes on and takes writes again by itself once it can",
            retry_after=10, details=details)
    return None


def _free_bytes(path: str) -> int:
    """Bytes an unprivileged user may still write on the file system holding ``path``
    (-1 when it cannot be told)."""
    return _space(path)[0]


def _space(path: str) -> tuple[int, int]:
    """(free bytes, size in bytes) of the file system holding ``path``; (-1, 0) when it
    cannot be told."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return -1, 0
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class Faults:
    """Why the database cannot be written, from the last failed write until it can be.

    The writer reports each failed write (:meth:`failed`) and each commit while a fault
    is kept (:meth:`committed`); anyone may ask :meth:`current` (``/healthz`` does), which
    also looks, cheaply and without waiting, whether the cause has gone meanwhile: a fault
    must clear by itself even when nothing writes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fault: StoreUnwritable | None = None
        self._free_at_fault = 0        # free bytes when the disk was found full
        self._looked_at = 0.0          # time.monotonic() of the last look for a free lock
        #: time.monotonic() when writes began to fail (None while they succeed).
        self.since: float | None = None

    @property
    def active(self) -> bool:
        """True while a fault is kept (no look for its cause: cheap on every commit)."""
        return self._fault is not None

    def failed(self, e: BaseException) -> StoreUnwritable | None:
        """A write failed with ``e``: keep and return the fault it stands for (None when
        ``e`` does not mean the database cannot be written)."""
        fault = unwritable(e, self.path)
        if fault is None:
            return None
        with self._lock:
            if self._fault is None:
                self.since = time.monotonic()
            self._fault = fault
            if isinstance(fault, DatabaseFull):
                self._free_at_fault = max(0, _free_bytes(self.path))
        return fault

    def committed(self, stored: bool) -> None:
        """A write committed; ``stored`` when it changed rows. Taking the write lock ends a
        lock fault; only a write that stored something ends the others (an empty commit
        writes nothing to the disk, so it proves nothing about space)."""
        with self._lock:
            if self._fault is not None and (stored or isinstance(self._fault, DatabaseLocked)):
                self._clear()

    def current(self) -> StoreUnwritable | None:
        """The fault kept, or None once the database can be written. A full disk counts as
        freed when the file system has gained space since the failure; a lock as released
        when a write lock can be taken at once (looked at most once a second)."""
        with self._lock:
            fault = self._fault
            if isinstance(fault, DatabaseFull):
                free, size = _space(self.path)
                if free > self._free_at_fault + min(_LOW_SPACE, size // 50):
                    self._clear()
            elif isinstance(fault, DatabaseLocked):
                now = time.monotonic()
                if now - self._looked_at >= _LOCK_LOOK_EVERY:
                    self._looked_at = now
                    if _lock_is_free(self.path):
                        self._clear()
            return self._fault

    def _clear(self) -> None:
        self._fault = None
        self.since = None


def _lock_is_free(path: str) -> bool:
    """True when a write transaction can begin on ``path`` without waiting."""
    try:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


__all__ = ["BUSY_TIMEOUT_MS", "WAL_SIZE_LIMIT", "Faults", "unwritable"]
