"""Named leases: which of the processes sharing one database may do what only one may do.

A lease is a row ``(name, holder, expires)``. Its holder renews it before ``expires``
(``time.time()``, seconds); anyone may take it once it has expired, or sooner when the
caller knows its holder is dead. Every change is one short write transaction on a
connection of the lease's own, so a renewal never waits behind the store's group commits,
and it waits for another process's write lock at most ``busy_ms`` milliseconds.

:func:`held` is read inside the store's own write transactions, so a claim can be made
conditional on the lease in the same transaction that makes it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from bulkrunner.errors import StoreUnavailable, StoreUnwritable


def held(conn: sqlite3.Connection, name: str, holder: str, now: float) -> bool:
    """Whether ``holder`` holds the lease ``name`` at ``now`` (read in the caller's
    transaction)."""
    row = conn.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
    return row is not None and row[0] == holder and row[1] > now


class Leases:
    """The leases of one database file, on a connection of their own."""

    def __init__(self, path: str, *, busy_ms: int = 500) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=busy_ms / 1000)
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            # WAL (set by the store): a lease write survives a killed process at NORMAL.
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open the database {path} for its leases ({e})",
                                   {"path": path}) from None

    def acquire(self, name: str, holder: str, ttl: float,
                is_dead: Callable[[str], bool] = lambda holder: False) -> tuple[bool, str | None]:
        """Take or renew the lease ``name`` for ``ttl`` seconds from now.

        It is taken when nobody holds it, when its holder's time is up, or when
        ``is_dead(holder)`` says its holder is gone; renewed when ``holder`` holds it
        (even past its time: nobody took it meanwhile, so nothing it did was undone).
        Returns (whether ``holder`` holds it now, who holds it).

        Raises:
            StoreUnwritable: the database could not be written (locked by another writer
                for longer than ``busy_ms``, a full disk).
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            row = conn.execute("SELECT holder, expires FROM leases WHERE name = ?",
                               (name,)).fetchone()
            current = None if row is None else str(row[0])
            if current is None or current == holder or row[1] <= now or is_dead(current):
                conn.execute("INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, "
                             "expires = excluded.expires", (name, holder, now + ttl))
                current = holder
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreUnwritable(f"the lease {name!r} could not be written ({e})",
                                      retry_after=1, details={"lease": name}) from None
            raise
        return current == holder, current

    def release(self, name: str, holder: str) -> bool:
        """Give the lease up if ``holder`` holds it (so another process may take it at
        once); True when it did."""
        try:
            cur = self._conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?",
                                     (name, holder))
        except sqlite3.Error:  # it expires by itself soon
            return False
        return cur.rowcount > 0

    def read(self, name: str) -> tuple[str, float] | None:
        """(holder, expires) of the lease ``name``, or None when nobody holds it."""
        row = self._conn.execute("SELECT holder, expires FROM leases WHERE name = ?",
                                 (name,)).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def close(self) -> None:
        """Close the lease connection."""
        self._conn.close()


__all__ = ["Leases", "held"]
