"""The schema: migrations as an ordered list of small functions, keyed by PRAGMA user_version."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable


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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3]


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Each step is one transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for i, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {i}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
