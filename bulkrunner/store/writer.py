"""Group commit on one SQLite connection, with no writer thread of its own.

A thread that wants to write appends its operation to the pending list and, if no other
thread is writing, becomes the *leader*: it runs everything pending in one transaction,
commits it, and wakes each waiting thread with its result; otherwise it waits for the
leader to commit its operation. So one client waits for one commit on its own thread (no
hand-off to another thread and back, each of which costs tens of microseconds under the
GIL), and a burst of submissions shares one fsync.

New jobs are written by :mod:`bulkrunner.store.inserts`: in the batch's transaction with
the other operations, or, past ``SLICE_ITEMS`` items, in slices of their own commits.

When the database cannot be written (a full disk, a write lock another program holds past
the busy timeout, an I/O error) the batch's transaction is rolled back and every operation
in it fails with a :class:`~bulkrunner.errors.StoreUnwritable` (HTTP 503): nothing is stored
half-way. A lock held past the timeout also fails every operation waiting for the leader at
that moment, so no caller waits much longer than one busy timeout. What the failure was is
kept in :attr:`Writer.faults` until a write succeeds again.
"""

from __future__ import annotations

import contextlib
import copy
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bulkrunner.errors import (
    DatabaseLocked,
    StoreUnwritable,
)
from bulkrunner.models import STATES
from bulkrunner.store import inserts
from bulkrunner.store.faults import BUSY_TIMEOUT_MS, WAL_SIZE_LIMIT, Faults, unwritable
from bulkrunner.store.records import JobChange, NewJob, Tx, _apply_counts, _zero_counts

T = TypeVar("T")
_MAX_BATCH = 512
#: Items waiting, from the job counters (the index of jobs with queued items).
QUEUED_TOTAL = "SELECT COALESCE(SUM(n_queued), 0) FROM jobs WHERE n_queued > 0"
class _Op:
    """One write waiting for a leader: a function of the transaction, or a new job."""

    __slots__ = ("changes", "done", "durable", "error", "fn", "gate", "lead", "new", "value")

    def __init__(self, fn: Callable[[Tx], Any] | None, durable: bool,
                 new: tuple[NewJob, int | None] | None = None) -> None:
        self.fn = fn
        self.new = new
        self.durable = durable
        self.done = False
        self.lead = False  # the leader handed this operation's thread the lock
        self.value: Any = None
        self.error: BaseException | None = None
        self.changes: list[JobChange] = []
        # Held until the operation is committed: a waiter blocks on it in C, which costs a
        # fraction of an Event's Condition.
        self.gate = threading.Lock()
        self.gate.acquire()


class Writer:
    """Serialises the writes of every thread onto one connection, in group commits.

    Keeps two figures exact as it commits: ``queued`` (items waiting) and, once asked for,
    item counts by task and state.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # Request threads lead commits: past this a submission answers 503, not a hang.
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        path = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "")
        #: Why writes fail now (disk full, locked), kept until one succeeds again.
        self.faults = Faults(path)
        self._lock = threading.Lock()          # the leader's, handed on while writes wait
        self._pending: list[_Op] = []
        self._pending_lock = threading.Lock()
        self._sync = ""
        self.closed = False
        inserts.drop_stale_inserts(conn)
        #: Items waiting in the queue (from the job counters: a bulk still being written
        #: has none yet).
        self.queued: int = conn.execute(QUEUED_TOTAL).fetchone()[0]
        self._task_counts: dict[str, dict[str, int]] | None = None
        self._counts_lock = threading.Lock()

    # ------------------------------------------------------------------ the API
    def write(self, fn: Callable[[Tx], T], *, durable: bool = False) -> T:
        """Run ``fn`` inside the next group commit and return what it returns.

        Raises what ``fn`` raised (its changes are rolled back, others' are not), or the
        commit's error (then nothing of the batch is stored).
        """
        return self.write_tx(fn, durable=durable)[0]

    def write_tx(self, fn: Callable[[Tx], T], *, durable: bool = False
                 ) -> tuple[T, list[JobChange]]:
        """Like :meth:`write`, and also the jobs whose state the operation changed."""
        op = self._run(_Op(fn, durable))
        return op.value, op.changes

    def insert(self, new: NewJob, max_queued: int | None) -> tuple[int, bool, float]:
        """Commit a new job and its items as queued (``synchronous=FULL``).

        Returns (job sequence number, created, commit time); an idempotent replay of a key
        gives the original job's number and ``created=False``. Raises QueueFull past
        ``max_queued`` items waiting, KeyConflict for a key used with another body.
        """
        if len(new.items) > inserts.SLICE_ITEMS:
            return inserts.insert_sliced(self, new, max_queued)
        op = self._run(_Op(None, True, (new, max_queued)))
        return op.value  # type: ignore[no-any-return]

    def recount(self) -> None:
        """Count ``queued`` again from the job rows, and the counts by task at their next
        read: other processes that share the database change them too. Done inside a
        write, so no commit of this process comes between the count and the figure."""
        def count(tx: Tx) -> None:
            inserts.drop_stale_inserts(tx.conn)
            self.queued = int(tx.conn.execute(QUEUED_TOTAL).fetchone()[0])
            with self._counts_lock:
                self._task_counts = None

        self.write(count)

    def close(self) -> None:
        """Refuse new writes; wait for the one being committed."""
        with self._lock:
            self.closed = True

    # ------------------------------------------------------------------ leading
    def _run(self, op: _Op) -> _Op:
        if self.closed:
            raise RuntimeError("the store is closed")
        with self._pending_lock:
            self._pending.append(op)
        # Lead if nobody does, or when the leader hands over; else wait for the leader to
        # commit this operation. Waiters are woken each by their own gate, all at once,
        # not one after another through the lock (a chain of hand-offs that cost more
        # than the commit itself).
        woken = False  # the gate was released for a hand-over, and taken
        try:
            while not op.done:
                if op.lead:
                    if not woken:
                        op.gate.acquire()  # the hand-over's release, right after op.lead
                    op.lead = woken = False
                    self._lead(op)
                elif self._lock.acquire(blocking=False):
                    self._lead(op)
                elif op.gate.acquire(timeout=0.05) and not op.done:
                    woken = True  # a hand-over (op.lead is set before the gate is released)
        except BaseException:
            # Leaving without its answer (an interrupt): the operation is withdrawn if no
            # leader took it yet, and a lock handed to this thread goes on to the next.
            with self._pending_lock:
                if op in self._pending:
                    self._pending.remove(op)
                handed = op.lead
            if handed:
                self._pass_on()
            raise
        if op.error is not None:
            raise op.error
        return op

    def _lead(self, own: _Op) -> None:
        """Commit batches until ``own`` is committed (the caller holds the lock), then
        hand the lock to the thread of the next pending operation, or release it.

        A leader that went on while anything was pending kept its own caller waiting for
        as long as others kept writing: under eight busy clients, a tenth of a second and
        more at the 99th percentile. Handing over makes each caller lead its own batch at
        most; one that finds its operation committed by another leader just returns.
        """
        try:
            while not own.done:
                with self._pending_lock:
                    batch = self._pending[:_MAX_BATCH]
                    del self._pending[:_MAX_BATCH]
                if not batch:
                    break
                if self.closed:
                    for o in batch:
                        o.error, o.done = RuntimeError("the store is closed"), True
                        o.gate.release()
                    continue
                try:
                    fault = self._commit(batch)
                except BaseException as e:  # outside the transaction: nobody may wait for ever
                    for o in batch:
                        if not o.done:
                            o.value, o.changes = None, []
                            o.error, o.done = RuntimeError(
                                f"the write was interrupted ({e!r}); it may or may not "
                                "be stored"), True
                            o.gate.release()
                    raise
                if isinstance(fault, DatabaseLocked):
                    # The lock is another program's, held past the timeout: those who
                    # waited meanwhile would wait as long again, one batch after another.
                    with self._pending_lock:
                        waiting, self._pending = self._pending, []
                    for o in waiting:
                        o.value, o.error, o.changes, o.done = None, copy.copy(fault), [], True
                    batch += waiting
                for o in batch:
                    o.gate.release()
        finally:
            if not own.done:  # leaving on an error: the lock must not come back here
                with self._pending_lock:
                    if own in self._pending:
                        self._pending.remove(own)
            self._pass_on()

    def _pass_on(self) -> None:
        """Hand the lock (held by the caller) to the thread of the next pending operation,
        or release it when nothing is pending. Under the pending lock: an operation added
        after this look finds the lock free, one added before it is handed the lock."""
        nxt = None
        try:
            with self._pending_lock:
                nxt = self._pending[0] if self._pending else None
                if nxt is not None:
                    nxt.lead = True
                else:
                    self._lock.release()
        finally:
            if nxt is not None:  # even when interrupted: its thread waits for this
                nxt.gate.release()

    def _commit(self, batch: list[_Op]) -> StoreUnwritable | None:
        """Commit ``batch`` in one transaction; the fault when the database could not be
        written (then every operation of the batch failed with it)."""
        conn = self._conn
        sync = "FULL" if any(o.durable for o in batch) else "NORMAL"
        if sync != self._sync:
            conn.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        queued_before = self.queued
        deltas: list[dict[str, dict[str, int]]] = []
        plain = [o for o in batch if o.new is not None and o.new[0].key is None]
        faulty = self.faults.active
        changes_before = conn.total_changes if faulty else 0
        try:
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            if plain:
                self._insert_plain(plain, now, deltas)
            others = [o for o in batch if o.new is None or o.new[0].key is not None]
            for op in others:
                self._one(op, now, deltas, alone=len(batch) == 1)
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                # SQLite may have rolled back already on a full disk or an I/O error;
                # the batch's error is the one to report, not the rollback's.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self.queued = queued_before
            fault = self.faults.failed(e)
            for op in batch:
                # Each caller raises its own copy: one instance raised in several threads
                # would carry their tracebacks mixed together.
                op.value, op.error, op.changes = None, copy.copy(fault) if fault else e, []
                op.done = True
            return fault
        if faulty:
            self.faults.committed(conn.total_changes > changes_before)
        for delta in deltas:
            self._count_by_task(delta)
        for op in batch:
            op.done = True
        return None

    def _one(self, op: _Op, now: float, deltas: list[dict[str, dict[str, int]]],
             alone: bool = False) -> None:
        """An operation in a savepoint of its own: its error undoes only its changes. An
        operation ``alone`` in its transaction needs none (its error rolls back all)."""
        conn = self._conn
        tx = Tx(conn, now)
        if alone:
            op.value = self._apply(op, tx)
            self.queued += tx.queued_delta
            deltas.append(tx.by_task)
            op.changes = tx.changes
            return
        conn.execute("SAVEPOINT op")
        try:
            op.value = self._apply(op, tx)
            conn.execute("RELEASE op")
        except BaseException as e:  # handed back to the caller, never lost here
            if unwritable(e) is not None:
                raise  # the database's trouble, not this operation's: the batch fails
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            op.error = e
            return
        # Applied at once so the next operation's backpressure check sees it.
        self.queued += tx.queued_delta
        deltas.append(tx.by_task)
        op.changes = tx.changes

    def _apply(self, op: _Op, tx: Tx) -> Any:
        if op.new is not None:
            value = inserts.insert_keyed(tx, op.new[0], self.queued, op.new[1])
        else:
            assert op.fn is not None
            value = op.fn(tx)
        _apply_counts(tx)
        return value

    def _insert_plain(self, ops: list[_Op], now: float,
                      deltas: list[dict[str, dict[str, int]]]) -> None:
        """New jobs without a key, with all their items. A job that would overfill the
        queue gets QueueFull and is left out; the others go in."""
        by_task: dict[str, dict[str, int]] = {}
        for op in ops:
            assert op.new is not None
            new, max_queued = op.new
            n = len(new.items)
            op.error = inserts.queue_full(self.queued, n, max_queued)
            if op.error is not None:
                continue
            inserts.insert_new(self._conn, new, now)
            self.queued += n
            by_task.setdefault(new.task, _zero_counts())["queued"] += n
            op.value = (0, True, now)  # the sequence number is not needed for a new job
        if by_task:
            deltas.append(by_task)

    # ------------------------------------------------------------------ counts by task
    def counts_by_task(self) -> dict[str, dict[str, int]]:
        """Item counts by task and state over all stored jobs.

        Counted from the table once (inside a write, so no change slips between the count
        and the updates), then kept up to date at each commit: cheap to ask often.
        """
        with self._counts_lock:
            if self._task_counts is not None:
                return {t: dict(c) for t, c in self._task_counts.items()}

        def count(tx: Tx) -> None:
            rows = tx.conn.execute(
                "SELECT task, SUM(n_queued), SUM(n_running), SUM(n_succeeded), SUM(n_failed), "
                "SUM(n_cancelled) FROM jobs GROUP BY task").fetchall()
            with self._counts_lock:
                self._task_counts = {r[0]: dict(zip(STATES, r[1:], strict=True)) for r in rows}

        self.write(count)
        with self._counts_lock:
            counts: dict[str, dict[str, int]] = self._task_counts or {}
            return {t: dict(c) for t, c in counts.items()}

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


__all__ = ["Writer"]
