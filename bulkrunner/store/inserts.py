"""New jobs into the store: one of many in a group commit, one with an idempotency key,
and a big one in slices that no read sees until its last slice is committed."""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from typing import TYPE_CHECKING

from bulkrunner.errors import KeyConflict, QueueFull, Unavailable
from bulkrunner.store.records import NewJob, Tx

if TYPE_CHECKING:
    from bulkrunner.store.writer import Writer

#: Items of a new job written in one transaction at most. A bigger job goes in slices of
#: this many, each its own commit (about 10 ms of the writer), so that other writes (a
#: one-item submission, a dispatcher turn) wait for one slice, not for the whole bulk.
SLICE_ITEMS = 4000
#: The job row of a bulk whose items are still being written in slices: hidden from every
#: read (``doomed = 2``, as reads show only ``doomed = 0``), its counters zero, in a state
#: of its own. It becomes a queued job in the last slice's commit. One left behind by a
#: crash is handed to retention's deleter (``doomed = 1``) once it is this many seconds
#: old (another process sharing the database may still be writing a younger one).
INSERTING = "inserting"
_STALE_INSERT = 60.0


def insert_sliced(writer: Writer, new: NewJob, max_queued: int | None
                  ) -> tuple[int, bool, float]:
    """A big job in slices of SLICE_ITEMS items, each its own commit: first the hidden
    job row with the first slice, then the others, and in the last commit (at
    ``synchronous=FULL``, which makes the earlier ones durable too) the job becomes
    visible and queued, its key taken. Until then no read sees it and nothing claims
    it; on failure it goes to retention's deleter, and what a crash leaves is handed
    there at a later start."""
    n = len(new.items)

    def first(tx: Tx) -> int:
        if new.key is not None:
            found = keyed_original(tx, new)
            if found is not None:
                return -found  # an idempotent replay: nothing to write
        full = queue_full(writer.queued, n, max_queued)
        if full is not None:
            raise full
        row = tx.conn.execute(
            "INSERT INTO jobs (id, task, params, priority, max_attempts, timeout, state, "
            "created_at, run_after, submitted_by, schedule, notify_url, doomed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 2) RETURNING seq",
            (new.id, new.task, new.params_text, new.priority, new.max_attempts,
             new.timeout, INSERTING, tx.now, new.run_after, new.submitted_by,
             new.schedule, new.notify_url)).fetchone()
        insert_items(tx, int(row[0]), new, 0)
        return int(row[0])

    seq = writer.write(first)
    if seq < 0:
        return -seq, False, time.time()
    starts = range(0, n, SLICE_ITEMS)  # the first went with the job row
    try:
        for start in starts[1:-1]:
            writer.write(functools.partial(insert_items, seq=seq, new=new, start=start))

        def finish(tx: Tx) -> tuple[int, bool, float]:
            insert_items(tx, seq, new, starts[-1])
            if new.key is not None:
                found = keyed_original(tx, new)
                if found is not None:  # the same key went in meanwhile: that job it is
                    give_up_insert(tx, seq)
                    return found, False, tx.now
            shown = tx.conn.execute(
                "UPDATE jobs SET doomed = 0, state = 'queued', n_queued = ?, key = ?, "
                "body_hash = ?, created_at = ? WHERE seq = ? AND doomed = 2",
                (n, new.key, new.body_hash, tx.now, seq)).rowcount
            if not shown:  # taken for a crash's leftover by another process
                raise Unavailable("the submission took too long to write and was "
                                  "dropped; submit it again", retry_after=1)
            tx.queued_delta += n
            tx.by_task[new.task]["queued"] += n
            return seq, True, tx.now

        return writer.write(finish, durable=True)
    except BaseException:
        with contextlib.suppress(Exception):  # else a later start hands it over
            writer.write(lambda tx: give_up_insert(tx, seq))
        raise


def queue_full(queued: int, n: int, limit: int | None) -> QueueFull | None:
    """The error of a submission of ``n`` items that would put more than ``limit`` items
    in the queue, where ``queued`` wait already; None when they fit (or no limit is set)."""
    if limit is None or queued + n <= limit:
        return None
    return QueueFull(f"the queue is full ({queued} items waiting, the limit is "
                     f"jobs.max_queued = {limit}); try again later",
                     retry_after=5, details={"queued": queued, "limit": limit})


def insert_keyed(tx: Tx, new: NewJob, queued: int, max_queued: int | None
                  ) -> tuple[int, bool, float]:
    """A new job with an idempotency key: the original job when the key is known."""
    c = tx.conn
    assert new.key is not None
    found = keyed_original(tx, new)
    if found is not None:
        return found, False, tx.now
    n = len(new.items)
    full = queue_full(queued, n, max_queued)
    if full is not None:
        raise full
    insert_new(c, new, tx.now)
    tx.queued_delta += n
    tx.by_task[new.task]["queued"] += n
    return 0, True, tx.now  # the sequence number is not needed for a new job


def keyed_original(tx: Tx, new: NewJob) -> int | None:
    """The sequence number of the visible job holding ``new``'s key, if any (KeyConflict
    when its body differs)."""
    row = tx.conn.execute("SELECT seq, body_hash FROM jobs WHERE key = ?",
                          (new.key,)).fetchone()
    if row is None:
        return None
    if row[1] != new.body_hash:
        raise KeyConflict(f"the idempotency key {new.key!r} was used before with a "
                          "different submission; use a new key", {"key": new.key})
    return int(row[0])


def insert_items(tx: Tx, seq: int, new: NewJob, start: int) -> None:
    """One slice of a big job's items, from index ``start``."""
    part = list(new.items[start:start + SLICE_ITEMS])
    tx.conn.execute("INSERT INTO items (job_seq, idx, params, state, priority) "
                    "SELECT ?, key + ?, value, 'queued', ? FROM json_each(?)",
                    (seq, start, new.priority, json.dumps(part)))


def give_up_insert(tx: Tx, seq: int) -> None:
    """Hand a hidden, half-written job to retention's deleter."""
    tx.conn.execute("UPDATE jobs SET doomed = 1 WHERE seq = ? AND doomed = 2", (seq,))


def drop_stale_inserts(conn: sqlite3.Connection) -> None:
    """Hand the hidden jobs that a crash left half-written to retention's deleter."""
    conn.execute("UPDATE jobs SET doomed = 1 WHERE state = ? AND doomed = 2 "
                 "AND created_at < ?", (INSERTING, time.time() - _STALE_INSERT))


_INSERT_JOB = (
    "INSERT INTO jobs (id, task, params, priority, max_attempts, timeout, state, created_at, "
    "n_queued, key, body_hash, run_after, submitted_by, schedule, notify_url) "
    "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)")


def insert_new(conn: sqlite3.Connection, new: NewJob, now: float) -> None:
    """A new job, visible and queued, with all its items (a job of up to SLICE_ITEMS).

    Plain statements: an INSTEAD OF trigger doing the same costs about twice their time
    for a one-item job, which is most submissions."""
    seq = conn.execute(_INSERT_JOB, (
        new.id, new.task, new.params_text, new.priority, new.max_attempts, new.timeout, now,
        len(new.items), new.key, new.body_hash, new.run_after, new.submitted_by,
        new.schedule, new.notify_url)).lastrowid
    if len(new.items) == 1:
        conn.execute("INSERT INTO items (job_seq, idx, params, state, priority) "
                     "VALUES (?, 0, ?, 'queued', ?)", (seq, new.items[0], new.priority))
    else:
        conn.execute("INSERT INTO items (job_seq, idx, params, state, priority) "
                     "SELECT ?, key, value, 'queued', ? FROM json_each(?)",
                     (seq, new.priority, json.dumps(list(new.items))))


__all__ = ["INSERTING", "SLICE_ITEMS", "drop_stale_inserts", "insert_keyed", "insert_new",
           "insert_sliced", "queue_full"]
