"""Retention's SQL: counting and deleting finished jobs a budget of rows at a time."""

from __future__ import annotations

import sqlite3
from typing import Any

from bulkrunner.models import STATES
from bulkrunner.store.records import Tx

#: Rows one retention step deletes: a few ms of the writer's time.
PRUNE_BUDGET = 2000


def prunable(conn: sqlite3.Connection, state: str, before: float) -> tuple[int, int]:
    """(jobs, items) of jobs in ``state`` that finished before ``before``."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(n_queued + n_running + n_succeeded + n_failed + "
        "n_cancelled), 0) FROM jobs WHERE state = ? AND finished_at < ? AND doomed = 0",
        (state, before)).fetchone()
    return int(row[0]), int(row[1])



def prune_step(tx: Tx, state: str, before: float, budget: int = PRUNE_BUDGET
               ) -> tuple[int, int, bool]:
    """Delete some jobs in ``state`` that finished before ``before``, with their items
    and logs, touching about ``budget`` rows in one short transaction.

    Returns (jobs deleted, their items, whether to call again). Small jobs go whole. A
    job with more items than the budget is taken away first, at once: from then on no
    read finds it, retry and cancel answer 404 and the counts leave the totals. Its rows
    go in the following steps, a budget at a time (see :func:`reap`), so the writer
    is never held long; a job left half-deleted by a stop is finished by the next call.
    """
    if reap(tx.conn, budget):
        return 0, 0, True
    c = tx.conn
    rows = c.execute(
        "SELECT seq, task, n_queued, n_running, n_succeeded, n_failed, n_cancelled "
        "FROM jobs WHERE state = ? AND finished_at < ? AND doomed = 0 "
        "ORDER BY finished_at LIMIT ?", (state, before, budget)).fetchall()
    room = budget
    whole: list[Any] = []  # small jobs, deleted now (their items by the cascade)
    gone: list[Any] = []   # and the one taken away to be deleted later, if any
    for r in rows:
        total = sum(r[2:7])
        if total >= room:
            if not whole:
                # Its counters go to zero, so every sum over the jobs table is right;
                # its key is free for a new submission, as if it were deleted.
                c.execute("UPDATE jobs SET doomed = 1, key = NULL, n_queued = 0, "
                          "n_running = 0, n_succeeded = 0, n_failed = 0, "
                          "n_cancelled = 0 WHERE seq = ?", (r[0],))
                gone.append(r)
            break
        whole.append(r)
        room -= total
    c.executemany("DELETE FROM jobs WHERE seq = ?", ((r[0],) for r in whole))
    gone += whole
    for r in gone:
        counts = tx.by_task[r[1]]
        for s, n in zip(STATES, r[2:7], strict=True):
            counts[s] -= n
    return len(gone), sum(sum(r[2:7]) for r in gone), bool(rows)


def reap(c: sqlite3.Connection, budget: int) -> bool:
    """One budget of a doomed job's rows: logs first, then items, then the job row (whose
    foreign-key cascade then has fewer than ``budget`` items left to delete)."""
    row = c.execute("SELECT seq FROM jobs WHERE doomed = 1 ORDER BY seq LIMIT 1").fetchone()
    if row is None:
        return False
    seq = row[0]
    room = budget - c.execute("DELETE FROM logs WHERE id IN (SELECT id FROM logs "
                              "WHERE job_seq = ? LIMIT ?)", (seq, budget)).rowcount
    if room > 0:
        cut = c.execute("SELECT idx FROM items WHERE job_seq = ? ORDER BY idx "
                        "LIMIT 1 OFFSET ?", (seq, room)).fetchone()
        if cut is None:
            c.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
        else:
            c.execute("DELETE FROM items WHERE job_seq = ? AND idx < ?", (seq, cut[0]))
    return True
