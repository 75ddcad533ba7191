"""Reads of jobs and items, and the job-wide writes (cancel, retry), as SQL on a connection
or inside a write's transaction. :class:`~bulkrunner.store.Store` wraps them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bulkrunner.errors import AmbiguousId, JobFinished, NotFound, NothingToRetry
from bulkrunner.models import (
    FAILURE_MESSAGE_CHARS,
    MAX_FAILURE_GROUPS,
    STATES,
    Item,
    Job,
    State,
)
from bulkrunner.store import outbox
from bulkrunner.store.records import Tx, _loads

JOB_COLS = ("seq, id, task, params, priority, max_attempts, timeout, key, state, created_at, "
            "started_at, finished_at, message, n_queued, n_running, n_succeeded, n_failed, "
            "n_cancelled, run_after, submitted_by, schedule, notify_url")
ITEM_COLS = ("idx, params, state, attempts, result, error, errors, started_at, finished_at, "
             "progress, message, worker")


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every SELECT inside sees the same committed state (WAL), so a
    job cannot lose its items between two of them. Joins one already open."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def resolve_id(conn: sqlite3.Connection, ident: str) -> int:
    """The job sequence number for a full id or a unique prefix (a job that retention
    is deleting is not found)."""
    ident = ident.strip().lower()
    if not ident or len(ident) > 32 or any(ch not in "0123456789abcdef" for ch in ident):
        raise NotFound(f"no job with id {ident[:64]!r}", {"id": ident[:64]})
    if len(ident) == 32:
        rows = conn.execute("SELECT seq, id FROM jobs WHERE id = ? AND doomed = 0",
                            (ident,)).fetchall()
    else:
        rows = conn.execute("SELECT seq, id FROM jobs WHERE id >= ? AND id < ? "
                            "AND doomed = 0 LIMIT 5", (ident, ident + "g")).fetchall()
    if not rows:
        raise NotFound(f"no job with id {ident!r}", {"id": ident})
    if len(rows) > 1:
        raise AmbiguousId(f"the prefix {ident!r} matches several jobs; give more "
                          "characters", {"id": ident, "matches": [r[1] for r in rows]})
    return int(rows[0][0])



def new_notify(url: str | None) -> dict[str, Any] | None:
    """A job's ``notify`` before its delivery is queued (None without a webhook)."""
    return None if url is None else {"url": url, "state": "pending", "attempts": 0}


#: A single-item job's error without its traceback, as SQLite reads it for a list page.
_ERROR_SANS_TRACEBACK = ("CASE WHEN json_valid(error) THEN json_remove(error, '$.traceback') "
                         "ELSE error END")


def job_from_row(conn: sqlite3.Connection, row: Any, *, traceback: bool = True) -> Job:
    """A job record from a row of ``JOB_COLS`` (one more read for its progress or result);
    ``traceback=False`` leaves the traceback out of its error, in SQLite (the job list)."""
    counts = dict(zip(STATES, row[13:18], strict=True))
    total = sum(counts.values())
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    running_progress = 0.0
    if counts["running"]:
        running_progress = conn.execute(
            # Named: without statistics SQLite picks the primary key and reads every item
            # of the job (40 ms for 300,000), where the partial index holds only running ones.
            "SELECT COALESCE(SUM(progress), 0) FROM items INDEXED BY items_running "
            "WHERE job_seq = ? AND state = 'running'", (row[0],)).fetchone()[0]
    job = Job(id=row[1], task=row[2], params=json.loads(row[3]), priority=row[4],
              max_attempts=row[5], timeout=row[6], key=row[7], state=State(row[8]),
              created_at=row[9], started_at=row[10], finished_at=row[11],
              message=row[12], counts=counts, run_after=row[18], submitted_by=row[19],
              schedule=row[20], seq=row[0],
              progress=round((done + running_progress) / total, 4) if total else 1.0)
    if row[21] is not None:
        # A webhook: until the job ends (again, after a retry) its notice is to come; then
        # how the delivery queued when it ended is going (one index lookup).
        delivery = outbox.latest(conn, row[0]) if job.state.finished else None
        job.notify = new_notify(row[21]) if delivery is None else {
            "url": row[21], "state": delivery[0], "attempts": delivery[1]}
    if total == 1:
        error = "error" if traceback else _ERROR_SANS_TRACEBACK
        item = conn.execute(f"SELECT result, {error} FROM items WHERE job_seq = ?",
                            (row[0],)).fetchone()
        if item is not None:
            job.result = _loads(item[0])
            job.error = _loads(item[1])
    if counts["failed"]:  # no query for a job with no failed item (most, and every new one)
        job.failures = failure_groups(conn, row[0])
    return job


# The failed items of a job grouped by error type and message, in one pass over the
# items_failed index: INDEXED BY, because without statistics SQLite would rather scan
# every item of the job by its primary key (200,000 items with 10 failed: 28 ms, not 0.2).
# The message is cut to FAILURE_MESSAGE_CHARS characters in the group key: messages that
# differ only past it are one group, and a huge message (up to jobs.max_error_size) is
# neither compared whole nor sent whole in every job's JSON. The inner query reads each
# error's type and message once (its LIMIT -1 keeps SQLite from flattening it into the
# grouping, which would parse the JSON once per use: 1.6 s instead of 1.1 for 200,000
# failed items). An error that is not valid JSON (bulkrunner writes none, but json_extract
# would raise on one) counts as the default error of an attempt that reported none.
_FAILURE_GROUPS = f"""
SELECT COALESCE(t, 'Error'), substr(COALESCE(m, 'unknown error'), 1, {FAILURE_MESSAGE_CHARS}),
       COUNT(*) AS count, MIN(idx) AS first_index,
       MAX(length(m)) > {FAILURE_MESSAGE_CHARS}
FROM (SELECT idx, CASE WHEN json_valid(error) THEN json_extract(error, '$.type') END AS t,
             CASE WHEN json_valid(error) THEN json_extract(error, '$.message') END AS m
      FROM items INDEXED BY items_failed WHERE job_seq = ? AND state = 'failed' LIMIT -1)
GROUP BY 1, 2 ORDER BY count DESC, first_index LIMIT {MAX_FAILURE_GROUPS}
"""


def failure_groups(conn: sqlite3.Connection, seq: int) -> list[dict[str, Any]]:
    """Job ``seq``'s failed items grouped by error type and message (cut to
    ``FAILURE_MESSAGE_CHARS``, with a ``…`` when it was longer), most frequent first, then
    by first item; at most ``MAX_FAILURE_GROUPS`` groups of
    ``{"type", "message", "count", "first_index"}``."""
    return [{"type": str(t), "message": str(m) + ("…" if cut else ""), "count": int(n),
             "first_index": int(first)}
            for t, m, n, first, cut in conn.execute(_FAILURE_GROUPS, (seq,))]



def job_by_seq(conn: sqlite3.Connection, seq: int) -> Job:
    """One job by sequence number; NotFound when it is gone or being deleted."""
    row = conn.execute(f"SELECT {JOB_COLS} FROM jobs WHERE seq = ? AND doomed = 0",
                       (seq,)).fetchone()
    if row is None:
        raise NotFound(f"no job with sequence number {seq}")
    return job_from_row(conn, row)


def list_jobs(conn: sqlite3.Connection, *, state: str | None = None, task: str | None = None,
              limit: int = 20, before: int | None = None, submitted_by: str | None = None
              ) -> tuple[list[Job], int | None]:
    """Newest first (only those ``submitted_by`` that name, when given); returns the jobs
    (their errors without tracebacks) and the cursor of the next page (or None)."""
    where: list[str] = ["doomed = 0"]
    args: list[Any] = []
    if submitted_by:
        where.append("submitted_by = ?")
        args.append(submitted_by)
    if state:
        where.append("state = ?")
        args.append(state)
    if task:
        where.append("task = ?")
        args.append(task)
    if before is not None:
        where.append("seq < ?")
        args.append(before)
    sql = f"SELECT {JOB_COLS} FROM jobs WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?"
    rows = conn.execute(sql, (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return ([job_from_row(conn, r, traceback=False) for r in rows],
            rows[-1][0] if more else None)



def state_literal(state: str) -> str:
    """``state`` as an SQL string literal, to write into a statement rather than bind:
    SQLite uses a state's partial index (``items_queued``, ``items_running``,
    ``items_failed``, ``items_cancelled``) only for a state it can see. ValueError for a
    name that is not a state, so nothing else is ever written into a statement."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
    return f"'{state}'"


def items_page(conn: sqlite3.Connection, seq: int, *, state: str | None = None, limit: int,
               after: int | None) -> list[Item]:
    """A page of a job's items; NotFound when the job is gone or being deleted."""
    sql = f"SELECT {ITEM_COLS} FROM items WHERE job_seq = ?"
    args: list[Any] = [seq]
    if state:
        literal = state_literal(state)
        # The state's partial index, named: without statistics SQLite would rather walk
        # the job's items in index order, however few are in that state. Succeeded items
        # have no index of their own (most items end so): their pages walk the job's items.
        if state != "succeeded":
            sql = f"SELECT {ITEM_COLS} FROM items INDEXED BY items_{state} WHERE job_seq = ?"
        sql += f" AND state = {literal}"
    if after is not None:
        sql += " AND idx > ?"
        args.append(after)
    sql += " ORDER BY idx LIMIT ?"
    args.append(limit)
    out = []
    with snapshot(conn) as c:
        job = c.execute("SELECT params FROM jobs WHERE seq = ? AND doomed = 0",
                        (seq,)).fetchone()
        if job is None:  # deleted by retention since its id was resolved
            raise NotFound(f"no job with sequence number {seq}")
        base = json.loads(job[0])
        for r in c.execute(sql, args):
            params = {**base, **json.loads(r[1])} if r[1] else base
            out.append(Item(index=r[0], params=params, state=State(r[2]), attempts=r[3],
                            result=_loads(r[4]), error=_loads(r[5]),
                            errors=_loads(r[6]) or [], started_at=r[7],
                            finished_at=r[8], progress=r[9], message=r[10],
                            worker=r[11]))
    return out



def cancel(tx: Tx, seq: int, ident: str) -> list[tuple[int, int, int]]:
    """Cancel every unfinished item of job ``seq``; the (job_seq, index, claim) of the
    attempts that were running. JobFinished when it has finished already."""
    c = tx.conn
    row = c.execute("SELECT state FROM jobs WHERE seq = ? AND doomed = 0",
                    (seq,)).fetchone()
    if row is None:  # deleted by retention since its id was resolved
        raise NotFound(f"no job with id {ident!r}", {"id": ident})
    state = row[0]
    if State(state).finished:
        raise JobFinished(f"the job has already finished ({state}); nothing to cancel",
                          {"state": state})
    running = [(seq, r[0], r[1]) for r in c.execute(
        "SELECT idx, claim FROM items INDEXED BY items_running "
        "WHERE job_seq = ? AND state = 'running'",
        (seq,))]
    err = json.dumps({"type": "Cancelled", "message": "cancelled by request",
                      "traceback": ""})
    n_q = c.execute("UPDATE items INDEXED BY items_queued SET state = 'cancelled', "
                    "finished_at = ? WHERE job_seq = ? AND state = 'queued'",
                    (tx.now, seq)).rowcount
    n_r = c.execute("UPDATE items INDEXED BY items_running "
                    "SET state = 'cancelled', finished_at = ?, error = ? "
                    "WHERE job_seq = ? AND state = 'running'",
                    (tx.now, err, seq)).rowcount
    tx.move(seq, "queued", "cancelled", n_q)
    tx.move(seq, "running", "cancelled", n_r)
    return running


def retry(tx: Tx, seq: int, ident: str) -> None:
    """Re-queue the failed and cancelled items of job ``seq`` with fresh attempts."""
    c = tx.conn
    if c.execute("SELECT 1 FROM jobs WHERE seq = ? AND doomed = 0",
                 (seq,)).fetchone() is None:  # retention took it since it was resolved
        raise NotFound(f"no job with id {ident!r}", {"id": ident})
    for state in ("failed", "cancelled"):  # each through its own partial index
        n = c.execute(f"UPDATE items INDEXED BY items_{state} SET state = 'queued', "
                      "attempts = 0, interruptions = 0, not_before = 0, error = NULL, "
                      "result = NULL, progress = NULL, message = NULL, started_at = NULL, "
                      f"finished_at = NULL WHERE job_seq = ? AND state = {state_literal(state)}",
                      (seq,)).rowcount
        tx.move(seq, state, "queued", n)
    if not tx.counts[seq]["queued"]:
        raise NothingToRetry("the job has no failed or cancelled items to retry")
