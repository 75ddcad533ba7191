"""The SQLite store: every read and write of jobs and items.

The only package that imports :mod:`sqlite3`. The queue itself lives here: items wait as
rows in state ``queued``; the dispatcher claims them job by job as its claim policy plans
(``claims.py``), or in priority then FIFO order without one.

- ``writer.py``: group commit (every write of every thread, batched on one connection);
  ``inserts.py``: new jobs, a big one in slices;
- ``turns.py``: the dispatcher's turn, its ends, reports and claims in one transaction;
- ``jobs.py``: reads of jobs and items, cancel and retry; ``exports.py``: what exports read;
- ``transitions.py``: how items move (claims, ends of attempts, re-queue, progress);
- ``claims.py``: what the claim policy reads (waiting jobs, pauses) and its planned claims;
- ``prune.py``: retention's deletes; ``schema.py``: migrations; ``records.py``: the records.

Submissions are committed with ``synchronous=FULL`` (a 202 survives a power cut); the
dispatcher's bookkeeping with ``NORMAL``, which in WAL mode survives a killed process, the
failure the recovery is about. The store decides no policy: retry backoff and the
interruption limit are given to it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from bulkrunner.errors import NotFound, StoreUnavailable, StoreUnwritable
from bulkrunner.models import STATES, Item, Job, State
from bulkrunner.store import claims, jobs, leases, outbox, prune, schedules, transitions, turns
from bulkrunner.store.claims import Planner, Waiting
from bulkrunner.store.exports import ExportRows
from bulkrunner.store.outbox import Attempt, Delivery
from bulkrunner.store.prune import PRUNE_BUDGET
from bulkrunner.store.records import Claimed, Finish, JobChange, NewJob, Tx
from bulkrunner.store.schedules import ScheduleRun
from bulkrunner.store.schema import MIGRATIONS, migrate
from bulkrunner.store.turns import Turn
from bulkrunner.store.writer import QUEUED_TOTAL, Writer

__all__ = ["MIGRATIONS", "PRUNE_BUDGET", "Claimed", "ExportRows", "Finish", "JobChange",
           "NewJob", "Planner", "Store", "Turn", "Tx", "Waiting", "migrate"]

T = TypeVar("T")


class Store:
    """Jobs and items in one SQLite file. Thread-safe; writes are serialised."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        try:
            self._create_private(path)
            self._wconn = self._connect()
        except sqlite3.Error as e:  # a missing directory, no permission
            raise StoreUnavailable(f"cannot open the database {os.path.abspath(path)} ({e})",
                                   {"path": path}) from None
        except OSError as e:
            raise StoreUnavailable(f"cannot open the database {os.path.abspath(path)} "
                                   f"({e.strerror})", {"path": path}) from None
        try:
            self._wconn.execute("PRAGMA journal_mode=WAL")
            self.version = migrate(self._wconn)
        except sqlite3.Error as e:  # not a database, or a read-only one
            self._wconn.close()
            raise StoreUnavailable(f"cannot use the database {os.path.abspath(path)} ({e})",
                                   {"path": path}) from None
        self._writer = Writer(self._wconn)
        #: What claims need of each job being served, read once (see claims.JobInfo).
        self._job_info = claims.JobInfo()
        self.write = self._writer.write
        self._closed = False
        #: (name, holder) of a lease that claims and re-queues of running items need: when
        #: set, they happen only while that holder holds it, checked in their transaction
        #: (several processes share the database; one dispatches). None: no such check.
        self.lease: tuple[str, str] | None = None

    @property
    def queued(self) -> int:
        """Items waiting in the queue (exact: kept by the writer as it commits)."""
        return self._writer.queued

    def recount(self) -> bool:
        """Count the queue (and the counts by task) again from the job rows when the
        count kept in memory differs: other processes sharing the database change them
        too. True when it was counted again."""
        if self._closed or self._read().execute(QUEUED_TOTAL).fetchone()[0] == self._writer.queued:
            return False
        self._writer.recount()
        return True

    def _holds(self, tx: Tx) -> bool:
        """Whether this process may claim and re-queue running items now (see ``lease``)."""
        return self.lease is None or leases.held(tx.conn, *self.lease, tx.now)

    def unwritable(self) -> StoreUnwritable | None:
        """Why the database cannot be written now (the last write failed: disk full, locked
        by another program), or None. Looks, without waiting, whether the cause is gone."""
        return self._writer.faults.current()

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _create_private(path: str) -> None:
        """Create the database file readable and writable by its owner only (0600),
        whatever the umask, when it does not exist yet. SQLite gives the ``-wal``, ``-shm``
        and ``-journal`` files it creates the database file's mode, so they are private
        too. An existing file keeps its mode (the server warns at start when others can
        read it)."""
        if path in ("", ":memory:"):
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        os.close(fd)

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

    def close(self) -> None:
        """Finish the write being committed and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._wconn.close()
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()

    # ------------------------------------------------------------------ jobs
    def insert_job(self, new: NewJob, *, max_queued: int | None = None) -> tuple[Job, bool]:
        """Commit a job and its items as queued. Returns (job, created).

        QueueFull when it would put more than ``max_queued`` items in the queue; an
        idempotent replay returns the original job with ``created=False``.
        """
        seq, created, now = self._writer.insert(new, max_queued)
        if not created:
            return self._job_by_seq(seq), False
        # Just inserted: build it from what we wrote rather than read it back.
        counts = dict.fromkeys(STATES, 0)
        counts["queued"] = len(new.items)
        return Job(id=new.id, task=new.task, params=new.params, state=State.QUEUED,
                   priority=new.priority, created_at=now, counts=counts,
                   max_attempts=new.max_attempts, timeout=new.timeout, key=new.key,
                   run_after=new.run_after, submitted_by=new.submitted_by,
                   schedule=new.schedule,
                   notify=jobs.new_notify(new.notify_url)), True

    def resolve_id(self, ident: str) -> int:
        """The job sequence number for a full id or a unique prefix (a job that retention
        is deleting is not found)."""
        return jobs.resolve_id(self._read(), ident)

    def get_job(self, ident: str) -> Job:
        """One job by id or unique prefix; NotFound when unknown."""
        return self._job_by_seq(self.resolve_id(ident))

    def _job_by_seq(self, seq: int) -> Job:
        return jobs.job_by_seq(self._read(), seq)

    def list_jobs(self, *, state: str | None = None, task: str | None = None,
                  limit: int = 20, before: int | None = None,
                  submitted_by: str | None = None) -> tuple[list[Job], int | None]:
        """Newest first; returns the jobs and the cursor of the next page (or None)."""
        return jobs.list_jobs(self._read(), state=state, task=task, limit=limit,
                              before=before, submitted_by=submitted_by)

    def cancel_job(self, ident: str
                   ) -> tuple[Job, list[tuple[int, int, int]], list[JobChange]]:
        """Cancel every unfinished item. Returns the job, the (job_seq, index, claim) of the
        attempts that were running (for the dispatcher to stop) and the job's change of
        state. JobFinished when the job has already finished."""
        seq = self.resolve_id(ident)
        keys, changes = self._writer.write_tx(lambda tx: jobs.cancel(tx, seq, ident))
        return self._job_by_seq(seq), keys, changes

    def retry_job(self, ident: str) -> tuple[Job, list[JobChange]]:
        """Re-queue the failed and cancelled items with fresh attempts; NothingToRetry if
        none. Returns the job and its change of state."""
        seq = self.resolve_id(ident)
        _, changes = self._writer.write_tx(lambda tx: jobs.retry(tx, seq, ident),
                                           durable=True)
        return self._job_by_seq(seq), changes

    # ------------------------------------------------------------------ items
    def list_items(self, ident: str, *, state: str | None = None, limit: int = 100,
                   after: int | None = None) -> tuple[list[Item], int | None]:
        """A page of a job's items in index order, and the index to continue after."""
        seq = self.resolve_id(ident)
        items = jobs.items_page(self._read(), seq, state=state, limit=limit + 1, after=after)
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1].index if more and items else None)

    def export_rows(self, ident: str, *, state: str | None = None) -> ExportRows:
        """Every item of a job (or only those in ``state``) as stored, for an export: all
        read from one snapshot taken now, on a connection of its own (it lasts as long as
        the export is streamed, and must not hold this thread's reads in the past after
        that). NotFound is raised here, before the first row."""
        return ExportRows(self._reader(), ident, state)

    # ------------------------------------------------------------------ dispatcher side
    def turn(self, finishes: Sequence[Finish], n: int,
             backoff: Callable[[int], float] = lambda attempt: 0.0, *,
             progress: Mapping[tuple[int, int], tuple[float | None, str | None]] | None = None,
             logs: Mapping[tuple[int, int, int], str] | None = None,
             planner: Planner | None = None) -> Turn:
        """The dispatcher's turn in one transaction (see :func:`turns.turn`): record
        ``finishes``, ``progress`` and ``logs``, claim up to ``n`` items."""
        return turns.turn(self._writer, self._holds, self._job_info, finishes, n, backoff,
                          progress=progress, logs=logs, planner=planner)

    def waiting_jobs(self, limit: int = 50_000) -> list[Waiting]:
        """Jobs with queued items, highest priority then oldest first, at most ``limit``."""
        return claims.waiting_jobs(self._read(), limit)

    def new_waiting_jobs(self, after_seq: int, limit: int = 50_000) -> list[Waiting]:
        """Jobs with queued items submitted after job ``after_seq``."""
        return claims.new_waiting_jobs(self._read(), after_seq, limit)

    def paused_tasks(self) -> set[str]:
        """The tasks a user paused (kept across restarts)."""
        return claims.paused_tasks(self._read())

    def set_task_paused(self, task: str, paused: bool) -> bool:
        """Pause or resume a task; True when that changed something."""
        return bool(self.write(lambda tx: claims.set_task_paused(tx, task, paused),
                               durable=True))

    def pause_job(self, ident: str, paused: bool = True) -> tuple[Job, list[JobChange]]:
        """Pause (or resume) a job: its queued items do not start (running ones finish).

        JobFinished when it has finished; NotPaused on a resume of a job not paused.
        Returns the job and its change of state."""
        seq = self.resolve_id(ident)
        _, changes = self._writer.write_tx(
            lambda tx: claims.set_job_paused(tx, seq, ident, paused), durable=True)
        return self._job_by_seq(seq), changes

    def claim(self, n: int) -> list[Claimed]:
        """Move up to ``n`` queued items (priority, then oldest first) to running."""
        return self.turn((), n).claimed

    def finish(self, finishes: Sequence[Finish],
               backoff: Callable[[int], float] = lambda attempt: 0.0) -> Turn:
        """Record ended attempts (a turn that claims nothing)."""
        return self.turn(finishes, 0, backoff)

    def record_progress(self, updates: dict[tuple[int, int], tuple[float | None, str | None]]
                        ) -> None:
        """Store the latest progress and message of running items (and the job's message)."""
        if updates:
            self.write(lambda tx: transitions.record_progress(tx, updates))

    def requeue_running(self, *, interrupted: bool, max_interruptions: int = 3
                        ) -> tuple[dict[str, int], dict[str, dict[str, int]], list[JobChange]]:
        """Put every running item back in the queue, never spending an attempt.

        With ``interrupted=True`` (start-up after a crash) each counts an interruption, and
        an item interrupted ``max_interruptions`` times fails instead. Returns
        ``{"requeued": n, "failed": m}``, the same counts for each job id, and the jobs
        whose state changed.
        """
        def op(tx: Tx) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
            if not self._holds(tx):  # the lease holder's items: not ours to re-queue
                return {"requeued": 0, "failed": 0}, {}
            return transitions.requeue_running(tx, interrupted, max_interruptions)

        (counts, per_job), changes = self._writer.write_tx(op, durable=True)
        return counts, per_job, changes

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
        if chunks:
            self.write(lambda tx: transitions.append_logs(tx, chunks))

    def read_log(self, ident: str, index: int) -> tuple[list[tuple[int, str]], str]:
        """An item's captured output as (claim, text) chunks in the order they came, and
        the item's state (read first, so a finished item's log is complete)."""
        seq = self.resolve_id(ident)
        conn = self._read()
        row = conn.execute("SELECT state FROM items WHERE job_seq = ? AND idx = ?",
                           (seq, index)).fetchone() if 0 <= index < 2**63 else None
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
        """Item counts by task and state over all stored jobs; cheap to ask often."""
        return self._writer.counts_by_task()

    # ------------------------------------------------------------------ retention
    def prunable(self, state: str, before: float) -> tuple[int, int]:
        """(jobs, items) of jobs in ``state`` that finished before ``before``."""
        return prune.prunable(self._read(), state, before)

    def prune_step(self, state: str, before: float, budget: int = PRUNE_BUDGET
                   ) -> tuple[int, int, bool]:
        """Delete some jobs in ``state`` that finished before ``before`` with their items
        and logs, about ``budget`` rows in one short transaction; see
        :func:`bulkrunner.store.prune.prune_step`. Returns (jobs, items, call again)."""
        return self.write(lambda tx: prune.prune_step(tx, state, before, budget))

    def reap_step(self, budget: int = PRUNE_BUDGET) -> bool:
        """Delete about ``budget`` rows of a job taken away by :meth:`prune_step`; the job
        row goes with its last items. Returns False when no such job is left."""
        return self.write(lambda tx: prune.reap(tx.conn, budget))

    def reaping(self) -> int:
        """Jobs taken away by retention whose rows are not all deleted yet."""
        return int(self._read().execute(
            "SELECT COUNT(*) FROM jobs WHERE doomed = 1").fetchone()[0])

    # ------------------------------------------------------------------ webhooks
    def delivery_turn(self, attempts: Sequence[Attempt], n: int, lease: float
                      ) -> list[Delivery]:
        """The notifier's turn in one write: store how ``attempts`` ended (and what each
        delivery becomes), then claim up to ``n`` due deliveries, leased for ``lease``
        seconds; see :mod:`bulkrunner.store.outbox`."""
        if not attempts and n <= 0:
            return []

        def op(tx: Tx) -> list[Delivery]:
            outbox.record(tx, attempts)
            return outbox.claim_due(tx, n, tx.now + lease) if n > 0 else []

        return self.write(op)

    def deliveries_due_at(self) -> float | None:
        """When the next pending delivery is due; None when none is pending."""
        return outbox.next_due(self._read())

    def deliveries_pending(self) -> int:
        """Webhook deliveries waiting for an attempt."""
        return outbox.pending(self._read())

    def job_by_seq(self, seq: int) -> Job:
        """One job by its sequence number; NotFound when it is gone or being deleted."""
        return self._job_by_seq(seq)

    # ------------------------------------------------------------------ schedules
    def schedule_runs(self, enabled: Sequence[str] = (), disabled: Sequence[str] = ()
                      ) -> dict[str, ScheduleRun]:
        """Each schedule's row by name, after noting the schedules seen now (see
        :func:`bulkrunner.store.schedules.seen`)."""
        if enabled or disabled:
            self.write(lambda tx: schedules.seen(tx, enabled, disabled))
        return schedules.runs(self._read())

    def record_fire(self, name: str, fire: float, job_id: str | None) -> None:
        """Schedule ``name`` submitted job ``job_id`` for fire time ``fire``."""
        self.write(lambda tx: schedules.record_fire(tx, name, fire, job_id))
