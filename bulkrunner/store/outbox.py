"""The webhook outbox's SQL: one row per delivery of a finished job's notice.

A row is written by :func:`queue_delivery` in the transaction that ends its job, so the
notice survives anything that happens after the commit. The notifier claims due rows (a
lease: ``next_at`` moves past the attempt's end, so a process that dies mid-attempt leaves
the row to be tried again), then records how each attempt went. How often and how long to
try is the caller's policy: this module only stores what it is told.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # records imports this module: the name is for the type hints only
    from bulkrunner.store.records import Tx

@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: the outbox row, its job, and the body fixed at its first
    attempt (None before it)."""

    row: int
    job_seq: int
    delivery: str
    url: str
    attempts: int
    body: bytes | None


@dataclass(frozen=True)
class Attempt:
    """How one attempt of a delivery ended, and what the row becomes: ``state`` is
    ``pending`` (tried again at ``next_at``), ``delivered`` or ``failed``."""

    row: int
    state: str
    body: bytes
    status: int | None = None
    error: str | None = None
    next_at: float = 0.0


def queue_delivery(conn: sqlite3.Connection, job_seq: int, url: str, now: float) -> None:
    """A new delivery of job ``job_seq``'s notice to ``url``, due at once, with a unique
    delivery id (receivers deduplicate by it)."""
    conn.execute("INSERT INTO outbox (job_seq, delivery, url, next_at, created_at) "
                 "VALUES (?, ?, ?, ?, ?)", (job_seq, str(uuid.uuid4()), url, now, now))


def claim_due(tx: Tx, n: int, lease_until: float) -> list[Delivery]:
    """Up to ``n`` pending deliveries due by now, oldest due first, leased until
    ``lease_until`` (no other claim takes them before it)."""
    rows = tx.conn.execute(
        "UPDATE outbox SET next_at = ? WHERE id IN (SELECT id FROM outbox "
        "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?) "
        "RETURNING id, job_seq, delivery, url, attempts, body",
        (lease_until, tx.now, n)).fetchall()
    return sorted((Delivery(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows),
                  key=lambda d: d.row)


def record(tx: Tx, attempts: Sequence[Attempt]) -> None:
    """Store how attempts ended: the body sent (kept from the first), the answer's status
    or the error, and the row's new state; a finished row gets its ``finished_at``."""
    tx.conn.executemany(
        "UPDATE outbox SET state = ?, attempts = attempts + 1, body = COALESCE(body, ?), "
        "last_status = ?, last_error = ?, next_at = ?, "
        "finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE id = ?",
        ((a.state, a.body, a.status, a.error, a.next_at, a.state, tx.now, a.row)
         for a in attempts))


def latest(conn: sqlite3.Connection, job_seq: int) -> tuple[str, int] | None:
    """(state, attempts) of the job's newest delivery, or None before it has one."""
    row = conn.execute("SELECT state, attempts FROM outbox WHERE job_seq = ? "
                       "ORDER BY id DESC LIMIT 1", (job_seq,)).fetchone()
    return (str(row[0]), int(row[1])) if row is not None else None


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest pending delivery is due (or its lease ends); None when none is
    pending."""
    row = conn.execute("SELECT MIN(next_at) FROM outbox WHERE state = 'pending'").fetchone()
    return float(row[0]) if row[0] is not None else None


def pending(conn: sqlite3.Connection) -> int:
    """Deliveries waiting for an attempt (one index range: cheap to ask at each scrape)."""
    return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
               .fetchone()[0])
