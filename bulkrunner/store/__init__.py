"""The SQLite store: every read and write of jobs and items.

The only package that imports :mod:`sqlite3` (schema.py holds the migrations, records.py
what goes in and out, transitions.py how items move). The queue itself lives here: items
wait as rows in state ``queued`` and the dispatcher claims them in priority then FIFO order.

Writes go through one writer thread that batches whatever is waiting into one transaction
(group commit), so request threads never fight over the write lock and a burst of
submissions shares one fsync. Submissions are committed with ``synchronous=FULL`` (a 202
survives a power cut); the dispatcher's bookkeeping with ``NORMAL``, which in WAL mode
survives a killed process, the failure the contract's recovery is about.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from bulkrunner.errors import (
    AmbiguousId,
    JobFinished,
    KeyConflict,
    NotFound,
    NothingToRetry,
    StoreUnavailable,
)
from bulkrunner.models import STATES, Item, Job, State
from bulkrunner.store.records import (
    Claimed,
    Finish,
    JobChange,
    NewJob,
    Tx,
    _apply_counts,
    _loads,
    _zero_counts,
)
from bulkrunner.store.schema import MIGRATIONS, migrate
from bulkrunner.store.transitions import _claim, _finish, backoff_delay

__all__ = ["INTERRUPTIONS_ALLOWED", "MIGRATIONS", "PRUNE_BUDGET", "Claimed", "Finish",
           "JobChange", "NewJob", "Store", "Tx", "backoff_delay", "migrate"]

T = TypeVar("T")
INTERRUPTIONS_ALLOWED = 3
_WRITE_BATCH = 512
PRUNE_BUDGET = 2000  # rows one retention step deletes: a few ms of the writer's time


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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


class _Op:
    __slots__ = ("durable", "fn", "future")

    def __init__(self, fn: Callable[[Tx], Any], durable: bool) -> None:
        self.fn = fn
        self.durable = durable
        self.future: Future[Any] = Future()


_JOB_COLS = ("seq, id, task, params, priority, max_attempts, timeout, key, state, created_at, "
             "started_at, finished_at, message, n_queued, n_running, n_succeeded, n_failed, "
             "n_cancelled")
_ITEM_COLS = ("idx, params, state, attempts, result, error, errors, started_at, finished_at, "
              "progress, message, worker")


class Store:
    """Jobs and items in one SQLite file. Thread-safe; writes are serialised."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        try:
            self._wconn = self._connect()
        except sqlite3.Error as e:  # a missing directory, no permission
            raise StoreUnavailable(f"cannot open the database {os.path.abspath(path)} ({e})",
                                   {"path": path}) from None
        try:
            self._wconn.execute("PRAGMA journal_mode=WAL")
            self.version = migrate(self._wconn)
        except sqlite3.Error as e:  # not a database, or a read-only one
            self._wconn.close()
            raise StoreUnavailable(f"cannot use the database {os.path.abspath(path)} ({e})",
                                   {"path": path}) from None
        self._sync = ""
        #: Items waiting in the queue; kept exact by the writer thread.
        self.queued: int = self._wconn.execute(
            "SELECT COUNT(*) FROM items WHERE state = 'queued'").fetchone()[0]
        self._q: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="bulkrunner-store",
                                        daemon=True)
        #: Called on the writer thread after each commit with the jobs that changed state;
        #: keep it quick (it logs).
        self.on_job_change: Callable[[list[JobChange]], None] | None = None
        # Item counts by task and state, kept by the writer once first asked for.
        self._task_counts: dict[str, dict[str, int]] | None = None
        self._counts_lock = threading.Lock()
        self._writer.start()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _read(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._reader()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only=ON")
        return conn

    def write(self, fn: Callable[[Tx], T], *, durable: bool = False) -> T:
        """Run ``fn`` inside the writer's next transaction and return what it returns.

        Raises what ``fn`` raised (its changes are rolled back, others' are not).
        """
        if self._closed:
            raise RuntimeError("the store is closed")
        op = _Op(fn, durable)
        self._q.put(op)
        return op.future.result()  # type: ignore[no-any-return]

    def _write_loop(self) -> None:
        conn = self._wconn
        while True:
            op = self._q.get()
            if op is None:
                return
            batch = [op]
            while len(batch) < _WRITE_BATCH:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        sync = "FULL" if any(o.durable for o in batch) else "NORMAL"
        if sync != self._sync:
            conn.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        results: list[tuple[_Op, Any, BaseException | None, int]] = []
        changes: list[JobChange] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                tx = Tx(conn, time.time())
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(tx)
                    _apply_counts(tx)
                    conn.execute("RELEASE op")
                    # Applied at once so the next op's backpressure check sees it.
                    self.queued += tx.queued_delta
                    self._count_by_task(tx.by_task)
                    changes += tx.changes
                    results.append((op, value, None, tx.queued_delta))
                except BaseException as e:  # handed back to the caller, never lost here
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op, None, e, 0))
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.queued -= sum(r[3] for r in results)
            with self._counts_lock:
                self._task_counts = None  # counted from the table again when next asked
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(e)
            return
        for op, value, exc, _ in results:
            if exc is not None:
                op.future.set_exception(exc)
            else:
                op.future.set_result(value)
        if changes and self.on_job_change is not None:
            try:
                self.on_job_change(changes)
            except Exception:  # a listener must not stop the writer
                pass

    def _count_by_task(self, deltas: dict[str, dict[str, int]]) -> None:
        if not deltas or self._task_counts is None:
            return
        with self._counts_lock:
            counts = self._task_counts
            if counts is None:
                return
            for task, delta in deltas.items():
                row = counts.setdefault(task, _zero_counts())
                for state, n in delta.items():
                    row[state] += n

    def close(self) -> None:
        """Finish pending writes and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._writer.join(timeout=30)
        self._wconn.close()
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()

    # ------------------------------------------------------------------ jobs
    def insert_job(self, new: NewJob, *, max_queued: int | None = None,
                   check: Callable[[int], None] | None = None) -> tuple[Job, bool]:
        """Commit a job and its items as queued. Returns (job, created).

        ``check(queued_now)`` runs inside the transaction (backpressure); an idempotent
        replay returns the original job with ``created=False``.
        """
        def op(tx: Tx) -> tuple[int, bool, float]:
            c = tx.conn
            if new.key is not None:
                row = c.execute("SELECT seq, body_hash FROM jobs WHERE key = ?",
                                (new.key,)).fetchone()
                if row is not None:
                    if row[1] != new.body_hash:
                        raise KeyConflict(f"the idempotency key {new.key!r} was used before "
                                          "with a different submission; use a new key",
                                          {"key": new.key})
                    return row[0], False, tx.now
            if check is not None:
                check(self.queued)
            n = len(new.items)
            cur = c.execute(
                "INSERT INTO jobs (id, task, params, priority, max_attempts, timeout, key, "
                "body_hash, state, created_at, n_queued) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (new.id, new.task, json.dumps(new.params), new.priority, new.max_attempts,
                 new.timeout, new.key, new.body_hash, State.QUEUED.value, tx.now, n))
            seq = cur.lastrowid
            assert seq is not None
            c.executemany(
                "INSERT INTO items (job_seq, idx, params, state, priority) "
                "VALUES (?, ?, ?, 'queued', ?)",
                ((seq, i, p, new.priority) for i, p in enumerate(new.items)))
            tx.queued_delta += n
            tx.by_task[new.task]["queued"] += n
            return seq, True, tx.now

        seq, created, now = self.write(op, durable=True)
        if not created:
            return self._job_by_seq(seq), False
        # Just inserted: build it from what we wrote rather than read it back.
        counts = dict.fromkeys(STATES, 0)
        counts["queued"] = len(new.items)
        return Job(id=new.id, task=new.task, params=new.params, state=State.QUEUED,
                   priority=new.priority, created_at=now, counts=counts,
                   max_attempts=new.max_attempts, timeout=new.timeout, key=new.key), True

    def resolve_id(self, ident: str, conn: sqlite3.Connection | None = None) -> int:
        """The job sequence number for a full id or a unique prefix (a job that retention
        is deleting is not found)."""
        ident = ident.strip().lower()
        if not ident or len(ident) > 32 or any(ch not in "0123456789abcdef" for ch in ident):
            raise NotFound(f"no job with id {ident[:64]!r}", {"id": ident[:64]})
        conn = conn or self._read()
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

    def get_job(self, ident: str) -> Job:
        """One job by id or unique prefix; NotFound when unknown."""
        return self._job_by_seq(self.resolve_id(ident))

    def job_seq(self, ident: str) -> int:
        """The job sequence number for an id or unique prefix."""
        return self.resolve_id(ident)

    def _job_by_seq(self, seq: int) -> Job:
        row = self._read().execute(f"SELECT {_JOB_COLS} FROM jobs WHERE seq = ? "
                                   "AND doomed = 0", (seq,)).fetchone()
        if row is None:
            raise NotFound(f"no job with sequence number {seq}")
        return self._job_from_row(row)

    def _job_from_row(self, row: Sequence[Any]) -> Job:
        conn = self._read()
        counts = dict(zip(STATES, row[13:18], strict=True))
        total = sum(counts.values())
        done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
        running_progress = 0.0
        if counts["running"]:
            running_progress = conn.execute(
                "SELECT COALESCE(SUM(progress), 0) FROM items "
                "WHERE job_seq = ? AND state = 'running'", (row[0],)).fetchone()[0]
        job = Job(id=row[1], task=row[2], params=json.loads(row[3]), priority=row[4],
                  max_attempts=row[5], timeout=row[6], key=row[7], state=State(row[8]),
                  created_at=row[9], started_at=row[10], finished_at=row[11],
                  message=row[12], counts=counts,
                  progress=round((done + running_progress) / total, 4) if total else 1.0)
        if total == 1:
            item = conn.execute("SELECT result, error FROM items WHERE job_seq = ?",
                                (row[0],)).fetchone()
            if item is not None:
                job.result = _loads(item[0])
                job.error = _loads(item[1])
        return job

    def list_jobs(self, *, state: str | None = None, task: str | None = None,
                  limit: int = 20, before: int | None = None) -> tuple[list[Job], int | None]:
        """Newest first; returns the jobs and the cursor of the next page (or None)."""
        where: list[str] = ["doomed = 0"]
        args: list[Any] = []
        if state:
            where.append("state = ?")
            args.append(state)
        if task:
            where.append("task = ?")
            args.append(task)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        sql = f"SELECT {_JOB_COLS} FROM jobs WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._read().execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [self._job_from_row(r) for r in rows], (rows[-1][0] if more else None)

    def cancel_job(self, ident: str) -> tuple[Job, list[tuple[int, int, int]]]:
        """Cancel every unfinished item; returns the job and (job_seq, index, claim) of the
        attempts that were running (for the dispatcher to stop). 409 when the job has
        already finished."""
        seq = self.resolve_id(ident)

        def op(tx: Tx) -> list[tuple[int, int, int]]:
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
                "SELECT idx, claim FROM items WHERE job_seq = ? AND state = 'running'",
                (seq,))]
            err = json.dumps({"type": "Cancelled", "message": "cancelled by request",
                              "traceback": ""})
            n_q = c.execute("UPDATE items SET state = 'cancelled', finished_at = ? "
                            "WHERE job_seq = ? AND state = 'queued'", (tx.now, seq)).rowcount
            n_r = c.execute("UPDATE items SET state = 'cancelled', finished_at = ?, error = ? "
                            "WHERE job_seq = ? AND state = 'running'",
                            (tx.now, err, seq)).rowcount
            tx.move(seq, "queued", "cancelled", n_q)
            tx.move(seq, "running", "cancelled", n_r)
            return running

        keys = self.write(op)
        return self._job_by_seq(seq), keys

    def retry_job(self, ident: str) -> Job:
        """Re-queue the failed and cancelled items with fresh attempts; 409 if none."""
        seq = self.resolve_id(ident)

        def op(tx: Tx) -> None:
            c = tx.conn
            if c.execute("SELECT 1 FROM jobs WHERE seq = ? AND doomed = 0",
                         (seq,)).fetchone() is None:  # retention took it since it was resolved
                raise NotFound(f"no job with id {ident!r}", {"id": ident})
            for state, n in c.execute("SELECT state, COUNT(*) FROM items WHERE job_seq = ? AND "
                                      "state IN ('failed', 'cancelled') GROUP BY state", (seq,)
                                      ).fetchall():
                tx.move(seq, state, "queued", n)
            if not tx.counts[seq]["queued"]:
                raise NothingToRetry("the job has no failed or cancelled items to retry")
            c.execute("UPDATE items SET state = 'queued', attempts = 0, interruptions = 0, "
                      "not_before = 0, error = NULL, result = NULL, progress = NULL, "
                      "message = NULL, started_at = NULL, finished_at = NULL "
                      "WHERE job_seq = ? AND state IN ('failed', 'cancelled')", (seq,))

        self.write(op, durable=True)
        return self._job_by_seq(seq)

    # ------------------------------------------------------------------ items
    def list_items(self, ident: str, *, state: str | None = None, limit: int = 100,
                   after: int | None = None) -> tuple[list[Item], int | None]:
        """A page of a job's items in index order, and the index to continue after."""
        seq = self.resolve_id(ident)
        items = self._items(seq, state=state, limit=limit + 1, after=after)
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1].index if more and items else None)

    def iter_items(self, ident: str, chunk: int = 1000) -> Iterator[Item]:
        """Every item of a job in index order, read a chunk at a time (for export).

        Every chunk comes from one snapshot of the database, taken now: an export is whole
        even if retention deletes the job meanwhile. NotFound is raised here, before the
        first item, never halfway through.
        """
        # A connection of its own: the snapshot lasts as long as the export is streamed,
        # and must not hold this thread's reads in the past after that.
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            seq = self.resolve_id(ident, conn)
            first = self._items(seq, limit=chunk, after=None, conn=conn)
        except BaseException:
            conn.close()
            raise
        return self._more_items(conn, seq, first, chunk)

    def _more_items(self, conn: sqlite3.Connection, seq: int, items: list[Item],
                    chunk: int) -> Iterator[Item]:
        try:
            while True:
                yield from items
                if len(items) < chunk:
                    return
                items = self._items(seq, limit=chunk, after=items[-1].index, conn=conn)
        finally:
            conn.close()  # ends the snapshot

    def _items(self, seq: int, *, state: str | None = None, limit: int,
               after: int | None, conn: sqlite3.Connection | None = None) -> list[Item]:
        """A page of a job's items; NotFound when the job is gone or being deleted."""
        sql = f"SELECT {_ITEM_COLS} FROM items WHERE job_seq = ?"
        args: list[Any] = [seq]
        if state:
            sql += " AND state = ?"
            args.append(state)
        if after is not None:
            sql += " AND idx > ?"
            args.append(after)
        sql += " ORDER BY idx LIMIT ?"
        args.append(limit)
        out = []
        with _snapshot(conn or self._read()) as c:
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

    # ------------------------------------------------------------------ dispatcher side
    def claim(self, n: int) -> list[Claimed]:
        """Move up to ``n`` queued items (priority, then oldest first) to running."""
        if n <= 0:
            return []
        return self.write(lambda tx: _claim(tx, n))

    def finish(self, finishes: Sequence[Finish],
               backoff: Callable[[int], float] = lambda attempt: 0.0, *,
               states: list[str] | None = None) -> int:
        """Record ended attempts; stale ones (item no longer running that claim) are ignored.

        Returns how many were recorded. ``states``, when given, gets what each finish made
        of its item, in order: "queued" (to run again), "succeeded", "failed", or "stale".
        """
        if not finishes:
            return 0
        outcome: list[str] = []
        recorded = self.write(lambda tx: _finish(tx, finishes, backoff, outcome))
        if states is not None:
            states[:] = outcome
        return recorded

    def turn(self, finishes: Sequence[Finish], n: int,
             backoff: Callable[[int], float] = lambda attempt: 0.0, *,
             states: list[str] | None = None) -> list[Claimed]:
        """The dispatcher's turn in one transaction: record ``finishes``, then claim up to
        ``n`` items (one commit instead of two halves the writer's work per item)."""
        if not finishes and n <= 0:
            return []
        outcome: list[str] = []

        def op(tx: Tx) -> list[Claimed]:
            _finish(tx, finishes, backoff, outcome)
            return _claim(tx, n) if n > 0 else []

        claimed = self.write(op)
        if states is not None:
            states[:] = outcome
        return claimed

    def record_progress(self, updates: dict[tuple[int, int], tuple[float | None, str | None]]
                        ) -> None:
        """Store the latest progress and message of running items (and the job's message)."""
        if not updates:
            return

        def op(tx: Tx) -> None:
            c = tx.conn
            for (seq, idx), (frac, msg) in updates.items():
                c.execute("UPDATE items SET progress = COALESCE(?, progress), "
                          "message = COALESCE(?, message) "
                          "WHERE job_seq = ? AND idx = ? AND state = 'running'",
                          (frac, msg, seq, idx))
                if msg is not None:
                    c.execute("UPDATE jobs SET message = ? WHERE seq = ?", (msg, seq))

        self.write(op)

    def requeue_running(self, *, interrupted: bool,
                        jobs: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
        """Put every running item back in the queue.

        With ``interrupted=True`` (start-up after a crash) each counts an interruption, and
        an item interrupted ``INTERRUPTIONS_ALLOWED`` times fails instead. Attempts are never
        spent. Returns ``{"requeued": n, "failed": m}``; ``jobs``, when given, gets the same
        counts for each job id.
        """
        def op(tx: Tx) -> dict[str, int]:
            c = tx.conn
            rows = c.execute("SELECT i.job_seq, i.idx, i.interruptions, j.id FROM items i "
                             "JOIN jobs j ON j.seq = i.job_seq "
                             "WHERE i.state = 'running'").fetchall()
            out = {"requeued": 0, "failed": 0}
            per_job: dict[str, dict[str, int]] = {}
            for seq, idx, n, job_id in rows:
                mine = per_job.setdefault(job_id, {"requeued": 0, "failed": 0})
                n = n + 1 if interrupted else n
                if n >= INTERRUPTIONS_ALLOWED:
                    err = {"type": "Interrupted", "message":
                           f"the server stopped while this item ran, {n} times; it is not "
                           "run again in case it is what stops the server", "traceback": ""}
                    c.execute("UPDATE items SET state = 'failed', interruptions = ?, error = ?, "
                              "finished_at = ? WHERE job_seq = ? AND idx = ?",
                              (n, json.dumps(err), tx.now, seq, idx))
                    tx.move(seq, "running", "failed")
                    out["failed"] += 1
                    mine["failed"] += 1
                else:
                    c.execute("UPDATE items SET state = 'queued', interruptions = ?, "
                              "started_at = NULL, progress = NULL WHERE job_seq = ? AND idx = ?",
                              (n, seq, idx))
                    tx.move(seq, "running", "queued")
                    out["requeued"] += 1
                    mine["requeued"] += 1
            if jobs is not None:
                jobs.update(per_job)
            return out

        return self.write(op, durable=True)

    def stats(self) -> dict[str, int]:
        """Item counts by state over all jobs (from the job counters)."""
        row = self._read().execute(
            "SELECT COALESCE(SUM(n_queued),0), COALESCE(SUM(n_running),0), "
            "COALESCE(SUM(n_succeeded),0), COALESCE(SUM(n_failed),0), "
            "COALESCE(SUM(n_cancelled),0) FROM jobs").fetchone()
        return dict(zip(STATES, row, strict=True))

    # ------------------------------------------------------------------ logs
    def append_logs(self, chunks: Mapping[tuple[int, int, int], str]) -> None:
        """Append captured output, keyed by (job sequence number, item index, claim).

        Chunks of jobs deleted (or being deleted) meanwhile are dropped.
        """
        if not chunks:
            return

        def op(tx: Tx) -> None:
            tx.conn.executemany(
                "INSERT INTO logs (job_seq, idx, claim, text) SELECT ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM jobs WHERE seq = ? AND doomed = 0)",
                ((seq, idx, claim, text, seq) for (seq, idx, claim), text in chunks.items()))

        self.write(op)

    def read_log(self, ident: str, index: int) -> tuple[list[tuple[int, str]], str]:
        """An item's captured output as (claim, text) chunks in the order they came, and
        the item's state (read first, so a finished item's log is complete)."""
        seq = self.resolve_id(ident)
        conn = self._read()
        row = conn.execute("SELECT state FROM items WHERE job_seq = ? AND idx = ?",
                           (seq, index)).fetchone()
        if row is None:
            raise NotFound(f"the job has no item {index}", {"index": index})
        chunks = conn.execute("SELECT claim, text FROM logs WHERE job_seq = ? AND idx = ? "
                              "ORDER BY id", (seq, index)).fetchall()
        return [(int(c), str(t)) for c, t in chunks], str(row[0])

    # ------------------------------------------------------------------ metrics
    def oldest_queued_at(self) -> float | None:
        """Submission time of the oldest job that has queued items (None when none have).

        Two index lookups: the oldest job still wholly queued, and among running jobs
        (few: at most those with items on a worker or waiting for a retry) the oldest with
        queued items.
        """
        conn = self._read()
        times = [r[0] for r in (
            conn.execute("SELECT created_at FROM jobs WHERE state = 'queued' "
                         "ORDER BY seq LIMIT 1").fetchone(),
            conn.execute("SELECT created_at FROM jobs WHERE state = 'running' "
                         "AND n_queued > 0 ORDER BY seq LIMIT 1").fetchone()) if r]
        return min(times) if times else None

    def counts_by_task(self) -> dict[str, dict[str, int]]:
        """Item counts by task and state over all stored jobs.

        Counted from the table once (inside the writer, so no change slips between the
        count and the updates), then kept up to date by the writer: cheap to ask often.
        """
        with self._counts_lock:
            if self._task_counts is not None:
                return {t: dict(c) for t, c in self._task_counts.items()}

        def op(tx: Tx) -> None:
            rows = tx.conn.execute(
                "SELECT task, SUM(n_queued), SUM(n_running), SUM(n_succeeded), SUM(n_failed), "
                "SUM(n_cancelled) FROM jobs GROUP BY task").fetchall()
            with self._counts_lock:
                self._task_counts = {r[0]: dict(zip(STATES, r[1:], strict=True)) for r in rows}

        self.write(op)
        with self._counts_lock:
            counts: dict[str, dict[str, int]] = self._task_counts or {}
            return {t: dict(c) for t, c in counts.items()}

    # ------------------------------------------------------------------ retention
    def prunable(self, state: str, before: float) -> tuple[int, int]:
        """(jobs, items) of jobs in ``state`` that finished before ``before``."""
        row = self._read().execute(
            "SELECT COUNT(*), COALESCE(SUM(n_queued + n_running + n_succeeded + n_failed + "
            "n_cancelled), 0) FROM jobs WHERE state = ? AND finished_at < ? AND doomed = 0",
            (state, before)).fetchone()
        return int(row[0]), int(row[1])

    def prune_step(self, state: str, before: float, budget: int = PRUNE_BUDGET
                   ) -> tuple[int, int, bool]:
        """Delete some jobs in ``state`` that finished before ``before``, with their items
        and logs, touching about ``budget`` rows in one short transaction.

        Returns (jobs deleted, their items, whether to call again). Small jobs go whole. A
        job with more items than the budget is taken away first, at once: from then on no
        read finds it, retry and cancel answer 404 and the counts leave the totals. Its rows
        go in the following steps, a budget at a time (see :meth:`reap_step`), so the writer
        is never held long; a job left half-deleted by a stop is finished by the next call.
        """
        def op(tx: Tx) -> tuple[int, int, bool]:
            if _reap(tx.conn, budget):
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

        return self.write(op)

    def reap_step(self, budget: int = PRUNE_BUDGET) -> bool:
        """Delete about ``budget`` rows of a job taken away by :meth:`prune_step`; the job
        row goes with its last items. Returns False when no such job is left."""
        return self.write(lambda tx: _reap(tx.conn, budget))

    def reaping(self) -> int:
        """Jobs taken away by retention whose rows are not all deleted yet."""
        return int(self._read().execute(
            "SELECT COUNT(*) FROM jobs WHERE doomed = 1").fetchone()[0])


def _reap(c: sqlite3.Connection, budget: int) -> bool:
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
