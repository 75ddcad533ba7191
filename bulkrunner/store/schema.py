"""The schema: migrations as an ordered list of small functions, keyed by PRAGMA user_version."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

log = logging.getLogger("bulkrunner.store")


def _script(c: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT on its own; run the statements inside our transaction.
    for stmt in sql.split(";"):
        if stmt.strip():
            c.execute(stmt)


def _v1(c: sqlite3.Connection) -> None:
    _script(c, """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        task TEXT NOT NULL,
        params TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        timeout REAL NOT NULL DEFAULT 0,
        key TEXT UNIQUE,
        body_hash TEXT,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        message TEXT,
        n_queued INTEGER NOT NULL DEFAULT 0,
        n_running INTEGER NOT NULL DEFAULT 0,
        n_succeeded INTEGER NOT NULL DEFAULT 0,
        n_failed INTEGER NOT NULL DEFAULT 0,
        n_cancelled INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_state ON jobs(state, seq);
    CREATE INDEX jobs_by_task ON jobs(task, seq);
    CREATE TABLE items (
        job_seq INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        params TEXT,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        interruptions INTEGER NOT NULL DEFAULT 0,
        claim INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        errors TEXT,
        progress REAL,
        message TEXT,
        worker TEXT,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (job_seq, idx)
    ) WITHOUT ROWID;
    CREATE INDEX items_queue ON items(priority DESC, job_seq, idx) WHERE state = 'queued';
    CREATE INDEX items_running ON items(job_seq, idx) WHERE state = 'running';
    CREATE INDEX items_by_state ON items(job_seq, state, idx);
    """)


def _v2(c: sqlite3.Connection) -> None:
    # logs: what items printed and logged, appended in chunks by the dispatcher. ``claim``
    # is the item's run counter (every run, retried or re-run after a restart, has its own).
    # jobs_finished: retention finds old finished jobs without scanning the others.
    _script(c, """
    CREATE TABLE logs (
        id INTEGER PRIMARY KEY,
        job_seq INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        claim INTEGER NOT NULL,
        text TEXT NOT NULL
    );
    CREATE INDEX logs_by_item ON logs(job_seq, idx, id);
    CREATE INDEX jobs_finished ON jobs(state, finished_at) WHERE finished_at IS NOT NULL;
    """)


def _v3(c: sqlite3.Connection) -> None:
    # jobs.doomed: retention takes a job away in one short transaction (doomed = 1: no read
    # finds it, its counts leave the totals, retry and cancel answer 404) and deletes its
    # items and logs afterwards in small steps, the job row last. Deleting the row first
    # would cascade to every item in one long transaction, and SQLite cannot turn foreign
    # keys off inside one. jobs_doomed finds the jobs still being deleted (after a restart).
    _script(c, """
    ALTER TABLE jobs ADD COLUMN doomed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_doomed ON jobs(seq) WHERE doomed = 1;
    """)


def _v4(c: sqlite3.Connection) -> None:
    # Pacing and who submitted. jobs.paused: a paused job's queued items do not start (its
    # state reads 'paused' until every item has finished). run_after: no item starts before
    # it. jobs_waiting: the jobs with queued items, in claim order, read when the dispatcher
    # rebuilds its view of the queue (a few thousand rows at most, never the items).
    # task_flags: a task paused by a user (survives restarts).
    _script(c, """
    ALTER TABLE jobs ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN run_after REAL;
    ALTER TABLE jobs ADD COLUMN submitted_by TEXT;
    ALTER TABLE jobs ADD COLUMN schedule TEXT;
    ALTER TABLE jobs ADD COLUMN notify_url TEXT;
    CREATE INDEX jobs_waiting ON jobs(priority DESC, seq) WHERE n_queued > 0;
    CREATE INDEX jobs_by_submitter ON jobs(submitted_by, seq);
    CREATE TABLE task_flags (
        name TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """)


def _v5(c: sqlite3.Connection) -> None:
    # Webhooks: the outbox, one row per delivery, written in the transaction that ends the
    # job (so a kill -9 right after it loses no delivery). next_at is when the next attempt
    # is due, and while one is in flight, the end of its lease (a process that died
    # mid-attempt leaves the row to be tried again once it passes). body is the exact bytes
    # sent, fixed at the first attempt, so every retry carries the same signature. The
    # rows go with their job (retention). Schedules: since when each has been enabled
    # (first_seen: fire times before it are never caught up), whether it was enabled at
    # the last start, and the latest fire time it submitted, so a restart neither fires
    # twice nor misses its catch-up.
    _script(c, """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        job_seq INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
        delivery TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0,
        body BLOB,
        last_status INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX outbox_due ON outbox(next_at) WHERE state = 'pending';
    CREATE INDEX outbox_by_job ON outbox(job_seq, id);
    CREATE TABLE schedule_runs (
        name TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        last_fire REAL,
        last_job TEXT
    ) WITHOUT ROWID;
    """)


def _v6(c: sqlite3.Connection) -> None:
    # Leases: which process dispatches (several processes may share one database; exactly
    # one holds the dispatcher lease at a time and renews it).
    _script(c, """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires REAL NOT NULL
    ) WITHOUT ROWID;
    """)


def _v7(c: sqlite3.Connection) -> None:
    # Claims go job by job (jobs_waiting, then the job's queued items), so the index
    # of every queued item in priority order is read by nothing; each item written,
    # claimed or re-queued paid for keeping it.
    _script(c, "DROP INDEX IF EXISTS items_queue;")


def _v8(c: sqlite3.Connection) -> None:
    # An index of every item by (job, state, index) was rewritten twice for each item run:
    # at its claim and at its end. Partial indexes of the states that are looked for
    # within a job (the queued ones to claim; the failed ones to group and retry; the
    # cancelled ones to retry) leave an item that succeeds out of all of them but
    # items_running: a claim and an end cost about a third less each. A page of a job's
    # succeeded items reads the job's items in index order instead.
    _script(c, """
    CREATE INDEX items_queued ON items(job_seq, idx) WHERE state = 'queued';
    CREATE INDEX items_failed ON items(job_seq, idx) WHERE state = 'failed';
    CREATE INDEX items_cancelled ON items(job_seq, idx) WHERE state = 'cancelled';
    DROP INDEX items_by_state;
    """)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6,
                                                          _v7, _v8]


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Each step is one transaction.

    Several processes may open a new database at once (gunicorn workers): each step takes
    the write lock first and reads the version again inside it, so only one runs it.
    """
    start = conn.execute("PRAGMA user_version").fetchone()[0]
    began = time.monotonic()
    if 0 < start < len(MIGRATIONS):  # a database of an older bulkrunner, not a new one
        # A step may build an index over every item: say why the start takes a while.
        log.info("upgrading the database from schema version %d to %d (on a big database "
                 "this takes about a second a million items)", start, len(MIGRATIONS))
    while conn.execute("PRAGMA user_version").fetchone()[0] < len(MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < len(MIGRATIONS):
                MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if 0 < start < len(MIGRATIONS):
        log.info("database upgraded to schema version %d in %.1f s", len(MIGRATIONS),
                 time.monotonic() - began)
    return len(MIGRATIONS)
