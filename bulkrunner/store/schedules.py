"""What the database remembers of each schedule: since when it has been enabled, whether
it was at the last start, and the latest fire time a job was submitted for (with that
job's id).

A fire time is recorded after its job is committed; a server killed between the two
submits the same fire time again at its next start, and the job's idempotency key makes
that a replay of the same job, never a second one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkrunner.store.records import Tx


@dataclass(frozen=True)
class ScheduleRun:
    """A schedule's row: first seen (Unix seconds), latest fire time and its job's id."""

    name: str
    first_seen: float
    last_fire: float | None
    last_job: str | None


def runs(conn: sqlite3.Connection) -> dict[str, ScheduleRun]:
    """Every schedule's row, by name."""
    return {r[0]: ScheduleRun(r[0], r[1], r[2], r[3]) for r in conn.execute(
        "SELECT name, first_seen, last_fire, last_job FROM schedule_runs")}


def seen(tx: Tx, enabled: Iterable[str], disabled: Iterable[str]) -> None:
    """Note the schedules of this start. An enabled one seen for the first time, or
    disabled at the last start, is first seen now: the times before (when it did not
    exist, or was disabled) are never caught up."""
    tx.conn.executemany(
        "INSERT INTO schedule_runs (name, first_seen, enabled) VALUES (?, ?, 1) "
        "ON CONFLICT (name) DO UPDATE SET enabled = 1, first_seen = CASE "
        "WHEN enabled = 0 THEN excluded.first_seen ELSE first_seen END",
        ((n, tx.now) for n in enabled))
    tx.conn.executemany(
        "INSERT INTO schedule_runs (name, first_seen, enabled) VALUES (?, ?, 0) "
        "ON CONFLICT (name) DO UPDATE SET enabled = 0", ((n, tx.now) for n in disabled))


def record_fire(tx: Tx, name: str, fire: float, job_id: str | None) -> None:
    """Schedule ``name`` submitted job ``job_id`` for fire time ``fire`` (an older fire
    time never replaces a newer one)."""
    tx.conn.execute("UPDATE schedule_runs SET last_fire = ?, last_job = COALESCE(?, last_job) "
                    "WHERE name = ? AND (last_fire IS NULL OR last_fire <= ?)",
                    (fire, job_id, name, fire))
