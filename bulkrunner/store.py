"""The SQLite store: schema, migrations, and every read and write of jobs and items.

The only module that imports :mod:`sqlite3`. The queue itself lives here: items wait as rows
in state ``queued`` and the dispatcher claims them in priority then FIFO order.

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
import random
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bulkrunner.errors import (
    AmbiguousId,
    JobFinished,
    KeyConflict,
    NotFound,
    NothingToRetry,
    StoreUnavailable,
)
from bulkrunner.models import STATES, Item, Job, State, derive_state

T = TypeVar("T")
INTERRUPTIONS_ALLOWED = 3
_WRITE_BATCH = 512
PRUNE_BUDGET = 2000  # rows one retention step deletes: a few ms of the writer's time


# --------------------------------------------------------------------------- migrations
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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]


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


# --------------------------------------------------------------------------- records
@dataclass
class NewJob:
    """A validated submission, ready to insert. ``items`` are JSON texts (None: no overlay)."""

    id: str
    task: str
    params: dict[str, Any]
    items: Sequence[str | None]
    priority: int = 0
    max_attempts: int = 1
    timeout: float = 0.0
    key: str | None = None
    body_hash: str | None = None


@dataclass(frozen=True)
class Claimed:
    """An item the dispatcher has just moved to ``running``."""

    job_id: str
    job_seq: int
    index: int
    claim: int
    task: str
    params: dict[str, Any]
    timeout: float


@dataclass(frozen=True)
class Finish:
    """How to record the end of an attempt.

    ``charge=False`` re-queues the item without spending an attempt (it was an innocent
    bystander of a broken pool or a server stop).
    """

    job_seq: int
    index: int
    claim: int
    ok: bool = False
    result: str | None = None
    error: dict[str, Any] | None = None
    worker: str | None = None
    retryable: bool = True
    charge: bool = True


@dataclass(frozen=True)
class JobChange:
    """A job that changed state in a committed transaction (for the server's log)."""

    id: str
    task: str
    old: str
    new: str
    counts: dict[str, int]


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(STATES, 0)


@dataclass
class Tx:
    """What a write operation gets: the connection, the time, and the queue-size delta."""

    conn: sqlite3.Connection
    now: float
    queued_delta: int = 0
    counts: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(
        lambda: dict.fromkeys(STATES, 0)))
    #: Item-count deltas by task (for metrics) and the jobs that changed state.
    by_task: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(
        _zero_counts))
    changes: list[JobChange] = field(default_factory=list)

    def move(self, job_seq: int, old: str | None, new: str | None, n: int = 1) -> None:
        """Count ``n`` items of a job moving from state ``old`` to ``new``."""
        if n == 0:
            return
        c = self.counts[job_seq]
        if old:
            c[old] -= n
            if old == "queued":
                self.queued_delta -= n
        if new:
            c[new] += n
            if new == "queued":
                self.queued_delta += n


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
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
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

    def resolve_id(self, ident: str) -> int:
        """The job sequence number for a full id or a unique prefix."""
        ident = ident.strip().lower()
        if not ident or len(ident) > 32 or any(ch not in "0123456789abcdef" for ch in ident):
            raise NotFound(f"no job with id {ident[:64]!r}", {"id": ident[:64]})
        conn = self._read()
        if len(ident) == 32:
            rows = conn.execute("SELECT seq, id FROM jobs WHERE id = ?", (ident,)).fetchall()
        else:
            rows = conn.execute("SELECT seq, id FROM jobs WHERE id >= ? AND id < ? LIMIT 5",
                                (ident, ident + "g")).fetchall()
        if not rows:
            raise NotFound(f"no job with id {ident!r}", {"id": ident})
        if len(rows) > 1:
            raise AmbiguousId(f"the prefix {ident!r} matches several jobs; give more "
                              "characters", {"id": ident, "matches": [r[1] for r in rows]})
        return int(rows[0][0])

    def get_job(self, ident: str) -> Job:
        return self._job_by_seq(self.resolve_id(ident))

    def job_seq(self, ident: str) -> int:
        return self.resolve_id(ident)

    def _job_by_seq(self, seq: int) -> Job:
        row = self._read().execute(f"SELECT {_JOB_COLS} FROM jobs WHERE seq = ?",
                                   (seq,)).fetchone()
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
        where: list[str] = []
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
        sql = f"SELECT {_JOB_COLS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._read().execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [self._job_from_row(r) for r in rows], (rows[-1][0] if more else None)

    def cancel_job(self, ident: str) -> tuple[Job, list[tuple[int, int]]]:
        """Cancel every unfinished item; returns the job and the keys of items that were
        running (for the dispatcher to stop). 409 when the job has already finished."""
        seq = self.resolve_id(ident)

        def op(tx: Tx) -> list[tuple[int, int]]:
            c = tx.conn
            state = c.execute("SELECT state FROM jobs WHERE seq = ?", (seq,)).fetchone()[0]
            if State(state).finished:
                raise JobFinished(f"the job has already finished ({state}); nothing to cancel",
                                  {"state": state})
            running = [(seq, r[0]) for r in c.execute(
                "SELECT idx FROM items WHERE job_seq = ? AND state = 'running'", (seq,))]
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
        seq = self.resolve_id(ident)
        items = self._items(seq, state=state, limit=limit + 1, after=after)
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1].index if more and items else None)

    def iter_items(self, ident: str, chunk: int = 1000) -> Iterator[Item]:
        """Every item of a job in index order, read a chunk at a time (for export)."""
        seq = self.resolve_id(ident)
        after: int | None = None
        while True:
            items = self._items(seq, limit=chunk, after=after)
            yield from items
            if len(items) < chunk:
                return
            after = items[-1].index

    def _items(self, seq: int, *, state: str | None = None, limit: int,
               after: int | None) -> list[Item]:
        conn = self._read()
        base = json.loads(conn.execute("SELECT params FROM jobs WHERE seq = ?",
                                       (seq,)).fetchone()[0])
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
        for r in conn.execute(sql, args):
            params = {**base, **json.loads(r[1])} if r[1] else base
            out.append(Item(index=r[0], params=params, state=State(r[2]), attempts=r[3],
                            result=_loads(r[4]), error=_loads(r[5]),
                            errors=_loads(r[6]) or [], started_at=r[7], finished_at=r[8],
                            progress=r[9], message=r[10], worker=r[11]))
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

        Chunks of jobs deleted meanwhile are dropped.
        """
        if not chunks:
            return

        def op(tx: Tx) -> None:
            tx.conn.executemany(
                "INSERT INTO logs (job_seq, idx, claim, text) SELECT ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM jobs WHERE seq = ?)",
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
            "n_cancelled), 0) FROM jobs WHERE state = ? AND finished_at < ?",
            (state, before)).fetchone()
        return int(row[0]), int(row[1])

    def prune_step(self, state: str, before: float, budget: int = PRUNE_BUDGET
                   ) -> tuple[int, int, bool]:
        """Delete some jobs in ``state`` that finished before ``before``, with their items
        and logs, touching about ``budget`` rows in one short transaction.

        Returns (jobs deleted, their items, whether to call again). A job with more items than the
        budget loses them a budget at a time over several steps (readers may see it
        partly deleted meanwhile), so the writer is never held long.
        """
        def op(tx: Tx) -> tuple[int, int, bool]:
            c = tx.conn
            rows = c.execute(
                "SELECT seq, task, n_queued, n_running, n_succeeded, n_failed, n_cancelled "
                "FROM jobs WHERE state = ? AND finished_at < ? ORDER BY finished_at LIMIT ?",
                (state, before, budget)).fetchall()
            room = budget
            whole: list[Any] = []
            for r in rows:
                total = sum(r[2:7])
                if total < room or not whole:
                    # Past the budget only for the first job: cut a slice of its items.
                    cut = c.execute("SELECT idx FROM items WHERE job_seq = ? ORDER BY idx "
                                    "LIMIT 1 OFFSET ?", (r[0], room)).fetchone()
                    if cut is not None:
                        c.execute("DELETE FROM logs WHERE job_seq = ? AND idx < ?",
                                  (r[0], cut[0]))
                        c.execute("DELETE FROM items WHERE job_seq = ? AND idx < ?",
                                  (r[0], cut[0]))
                        return 0, 0, True
                    whole.append(r)
                    room -= max(total, 1)
                    if room <= 0:
                        break
                else:
                    break
            c.executemany("DELETE FROM jobs WHERE seq = ?", ((r[0],) for r in whole))
            for r in whole:
                counts = tx.by_task[r[1]]
                for s, n in zip(STATES, r[2:7], strict=True):
                    counts[s] -= n
            return len(whole), sum(sum(r[2:7]) for r in whole), bool(rows)

        return self.write(op)


_SUCCEED = ("UPDATE items SET state = 'succeeded', attempts = attempts + 1, result = ?, "
            "error = NULL, worker = ?, finished_at = ?, progress = 1 "
            "WHERE job_seq = ? AND idx = ? AND state = 'running' AND claim = ?")


def _claim(tx: Tx, n: int) -> list[Claimed]:
    c = tx.conn
    rows = c.execute(
        "SELECT i.job_seq, i.idx, i.params, i.claim, j.id, j.task, j.params, j.timeout "
        "FROM items i JOIN jobs j ON j.seq = i.job_seq "
        "WHERE i.state = 'queued' AND i.not_before <= ? "
        "ORDER BY i.priority DESC, i.job_seq, i.idx LIMIT ?", (tx.now, n)).fetchall()
    if not rows:
        return []
    c.executemany("UPDATE items SET state = 'running', claim = ?, started_at = ?, "
                  "progress = NULL, message = NULL, worker = NULL "
                  "WHERE job_seq = ? AND idx = ?",
                  ((r[3] + 1, tx.now, r[0], r[1]) for r in rows))
    out = []
    bases: dict[int, dict[str, Any]] = {}
    for r in rows:
        tx.move(r[0], "queued", "running")
        base = bases.get(r[0])
        if base is None:
            base = bases[r[0]] = json.loads(r[6])
        params = {**base, **json.loads(r[2])} if r[2] else base
        out.append(Claimed(job_id=r[4], job_seq=r[0], index=r[1], claim=r[3] + 1,
                           task=r[5], params=params, timeout=r[7]))
    return out


def _finish(tx: Tx, finishes: Sequence[Finish], backoff: Callable[[int], float],
            outcome: list[str]) -> int:
    c = tx.conn
    recorded = 0
    for f in finishes:
        if f.ok and f.charge:
            # The common case in one guarded UPDATE, no read first: a stale outcome (the
            # item was cancelled, timed out or claimed again) matches no row.
            cur = c.execute(_SUCCEED, (f.result, f.worker, tx.now, f.job_seq, f.index,
                                       f.claim))
            if cur.rowcount:
                recorded += 1
                tx.move(f.job_seq, "running", "succeeded")
                outcome.append("succeeded")
            else:
                outcome.append("stale")
            continue
        row = c.execute(
            "SELECT i.state, i.claim, i.attempts, j.max_attempts, i.errors "
            "FROM items i JOIN jobs j ON j.seq = i.job_seq "
            "WHERE i.job_seq = ? AND i.idx = ?", (f.job_seq, f.index)).fetchone()
        if row is None or row[0] != "running" or row[1] != f.claim:
            outcome.append("stale")
            continue
        recorded += 1
        if not f.charge:
            outcome.append("queued")
            c.execute("UPDATE items SET state = 'queued', started_at = NULL, "
                      "progress = NULL WHERE job_seq = ? AND idx = ?",
                      (f.job_seq, f.index))
            tx.move(f.job_seq, "running", "queued")
            continue
        attempts = row[2] + 1
        error = dict(f.error or {"type": "Error", "message": "unknown error"})
        error["attempt"] = attempts
        # Every attempt's error is kept (without tracebacks, the last 20).
        history = [*(_loads(row[4]) or [])[-19:],
                   {k: v for k, v in error.items() if k != "traceback"}]
        again = f.retryable and attempts < row[3]
        new_state = "queued" if again else "failed"
        c.execute("UPDATE items SET state = ?, attempts = ?, error = ?, errors = ?, "
                  "worker = ?, not_before = ?, finished_at = ?, "
                  "started_at = CASE WHEN ? THEN NULL ELSE started_at END "
                  "WHERE job_seq = ? AND idx = ?",
                  (new_state, attempts, json.dumps(error), json.dumps(history),
                   f.worker, tx.now + backoff(attempts) if again else 0,
                   None if again else tx.now, again, f.job_seq, f.index))
        tx.move(f.job_seq, "running", new_state)
        outcome.append(new_state)
    return recorded


def _apply_counts(tx: Tx) -> None:
    """Write the item-count deltas of ``tx`` to their jobs and derive each job's state."""
    for seq, delta in tx.counts.items():
        if not any(delta.values()):
            continue
        row = tx.conn.execute("SELECT n_queued, n_running, n_succeeded, n_failed, n_cancelled, "
                              "started_at, id, task, state FROM jobs WHERE seq = ?",
                              (seq,)).fetchone()
        counts = {s: row[i] + delta[s] for i, s in enumerate(STATES)}
        state = derive_state(counts)
        by_task = tx.by_task[row[7]]
        for s, n in delta.items():
            by_task[s] += n
        if state.value != row[8]:
            tx.changes.append(JobChange(row[6], row[7], row[8], state.value, counts))
        started = row[5]
        if started is None and delta["running"] > 0:  # an item started, not a cancel
            started = tx.now
        tx.conn.execute(
            "UPDATE jobs SET n_queued = ?, n_running = ?, n_succeeded = ?, n_failed = ?, "
            "n_cancelled = ?, state = ?, started_at = ?, "
            "finished_at = CASE WHEN ? THEN COALESCE(finished_at, ?) ELSE NULL END "
            "WHERE seq = ?",
            (*counts.values(), state.value, started, state.finished, tx.now, seq))
    tx.counts.clear()


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def backoff_delay(base: float, cap: float) -> Callable[[int], float]:
    """Exponential backoff with equal jitter: after attempt n, wait in [d/2, d] where
    d = min(cap, base * 2**(n-1))."""
    def delay(attempt: int) -> float:
        d = min(cap, base * (2.0 ** max(attempt - 1, 0)))
        return float(d / 2 + random.random() * d / 2)
    return delay
