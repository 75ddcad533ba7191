"""What the claim policy reads and writes: the jobs that wait, pauses, and claims of a
job's next items. The policy itself (who goes next) is the caller's; this module only
answers with rows and moves the items it is told to move."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bulkrunner.errors import JobFinished, NotFound, NotPaused
from bulkrunner.models import STATES, State, derive_state
from bulkrunner.store.records import Claimed, JobChange, Tx


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job with queued items, as the claim policy needs it."""

    seq: int
    priority: int
    task: str
    run_after: float | None
    paused: bool
    #: Its queued items when read (None: not known).
    queued: int | None = None


class Planner(Protocol):
    """The claim policy as the store sees it: asked what to claim inside the turn's
    transaction, told what each step gave, and whether the transaction held."""

    def begin(self, n: int, now: float) -> None:
        """A claim of up to ``n`` items starts at ``now``."""
        ...

    def plan(self) -> Sequence[tuple[int, int]]:
        """The next steps: ``(job_seq, items)``; empty to stop."""
        ...

    def took(self, seq: int, asked: int, got: int) -> None:
        """What a step gave."""
        ...

    def requeued(self, seq: int) -> None:
        """An item of job ``seq`` went back to the queue in this transaction."""
        ...

    def end_plan(self) -> None:
        """The turn (its requeued items and its claim) was committed."""
        ...

    def abandon_plan(self) -> None:
        """The turn's transaction failed: none of it happened."""
        ...


_WAITING_COLS = "seq, priority, task, run_after, paused, n_queued"


def waiting_jobs(conn: sqlite3.Connection, limit: int) -> list[Waiting]:
    """Jobs with queued items, highest priority then oldest first (the ``jobs_waiting``
    index: never the items)."""
    rows = conn.execute(f"SELECT {_WAITING_COLS} FROM jobs INDEXED BY jobs_waiting "
                        "WHERE n_queued > 0 ORDER BY priority DESC, seq LIMIT ?",
                        (limit,)).fetchall()
    return [Waiting(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]


def new_waiting_jobs(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[Waiting]:
    """Jobs with queued items submitted after job ``after_seq`` (a primary-key range)."""
    rows = conn.execute(f"SELECT {_WAITING_COLS} FROM jobs WHERE seq > ? AND n_queued > 0 "
                        "ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
    return [Waiting(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]


def paused_tasks(conn: sqlite3.Connection) -> set[str]:
    """The tasks a user paused."""
    return {r[0] for r in conn.execute("SELECT name FROM task_flags WHERE paused = 1")}


def set_task_paused(tx: Tx, task: str, paused: bool) -> bool:
    """Pause or resume a task; True when that changed something."""
    c = tx.conn
    old = c.execute("SELECT paused FROM task_flags WHERE name = ?", (task,)).fetchone()
    if bool(old and old[0]) == paused:
        return False
    c.execute("INSERT INTO task_flags (name, paused) VALUES (?, ?) "
              "ON CONFLICT(name) DO UPDATE SET paused = excluded.paused", (task, int(paused)))
    return True


def set_job_paused(tx: Tx, seq: int, ident: str, paused: bool) -> None:
    """Pause or resume job ``seq``: its state becomes ``paused``, or what its counts say.

    JobFinished when it has finished (nothing to pause); NotPaused on a resume of a job
    that is not paused."""
    c = tx.conn
    row = c.execute("SELECT id, task, state, paused, " + ", ".join(f"n_{s}" for s in STATES)
                    + " FROM jobs WHERE seq = ? AND doomed = 0", (seq,)).fetchone()
    if row is None:
        raise NotFound(f"no job with id {ident!r}", {"id": ident})
    job_id, task, state, was = row[0], row[1], row[2], bool(row[3])
    if State(state).finished:
        raise JobFinished(f"the job has already finished ({state}); there is nothing to "
                          f"{'pause' if paused else 'resume'}", {"state": state})
    if not paused and not was:
        raise NotPaused("the job is not paused; nothing to resume", {"state": state})
    if paused == was:
        return  # pausing a paused job: already what was asked
    counts = dict(zip(STATES, row[4:], strict=True))
    new = derive_state(counts, paused).value
    c.execute("UPDATE jobs SET paused = ?, state = ? WHERE seq = ?", (int(paused), new, seq))
    if new != state:
        tx.changes.append(JobChange(job_id, task, state, new, counts))


# A job's next claimable items: queued, past any retry backoff, in index order.
_NEXT = ("SELECT * FROM (SELECT job_seq, idx, params, claim FROM items INDEXED BY "
         "items_queued WHERE job_seq = ? AND state = 'queued' AND not_before <= ? "
         "ORDER BY idx LIMIT ?)")
_MOVE_SPAN = ("UPDATE items INDEXED BY items_queued SET state = 'running', "
              "claim = claim + 1, started_at = ?, progress = NULL, message = NULL, "
              "worker = NULL WHERE job_seq = ? AND state = 'queued' AND not_before <= ? "
              "AND idx BETWEEN ? AND ?")
_STEPS_PER_QUERY = 32
_JOB_CACHE = 4096


def _next_items_sql(steps: int) -> str:
    """One statement for ``steps`` jobs' next items (a UNION ALL of each job's LIMIT):
    one round trip into SQLite for a turn that serves many jobs, as fair share does. Its
    one row is a JSON array of [job_seq, idx, params (an object or null), claim]: a row a
    step would let go of the interpreter once per row, and each time wait to get it back
    behind the item threads (see ``transitions._SUCCEED_MANY``)."""
    parts = " UNION ALL ".join([_NEXT] * steps)
    return ("SELECT json_group_array(json_array(job_seq, idx, json(params), claim)) "
            f"FROM ({parts})")


class JobInfo:
    """What a claim needs of a job, read once: its id, task, decoded params, timeout.
    A job's params never change after it is submitted, so they are cached by sequence
    number (a bounded cache: the jobs being served now)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[str, str, dict[str, Any], float]] = {}

    def get(self, c: sqlite3.Connection, seqs: Sequence[int]
            ) -> dict[int, tuple[str, str, dict[str, Any], float]]:
        """The jobs among ``seqs`` that exist, by sequence number."""
        cache = self._cache
        missing = [s for s in seqs if s not in cache]
        if missing:
            if len(cache) + len(missing) > _JOB_CACHE:
                cache.clear()
            marks = ",".join("?" * len(missing))
            for seq, job_id, task, params, timeout in c.execute(
                    f"SELECT seq, id, task, params, timeout FROM jobs WHERE seq IN ({marks})",
                    missing):
                cache[seq] = (job_id, task, json.loads(params), timeout)
        return {s: cache[s] for s in seqs if s in cache}


def claim_planned(tx: Tx, plan: Callable[[], Sequence[tuple[int, int]]],
                  took: Callable[[int, int, int], None], started: float,
                  jobs: JobInfo | None = None) -> list[Claimed]:
    """Claim items job by job as ``plan()`` says: each ``(job_seq, n)`` moves that job's
    next ``n`` claimable items (queued, not waiting for a retry's backoff) to running, in
    index order, started at ``started``. ``took(job_seq, asked, got)`` is told what each
    gave (a job paused meanwhile, by another process, gives nothing); ``plan()`` is asked
    again while the last plan came up short, and stops the claim by answering nothing."""
    c = tx.conn
    jobs = jobs or JobInfo()
    out: list[Claimed] = []
    # The policy's view may be a few seconds old when another process sharing the
    # database paused a job or a task: the database has the last word.
    held = {r[0] for r in c.execute("SELECT name FROM task_flags WHERE paused = 1")}
    for _ in range(4):  # a short plan is retried a few times, never looped on
        steps = plan()
        if not steps:
            break
        seqs = [seq for seq, _ in steps]
        marks = ",".join("?" * len(seqs))
        paused = {r[0] for r in c.execute(
            f"SELECT seq FROM jobs WHERE paused = 1 AND seq IN ({marks})", seqs)}
        info = jobs.get(c, seqs)
        live = [(seq, n) for seq, n in steps
                if seq in info and seq not in paused and info[seq][1] not in held]
        got: dict[int, int] = dict.fromkeys(seqs, 0)
        spans: dict[int, list[int]] = {}  # job -> [first idx, last idx] claimed now
        loads = json.loads
        for i in range(0, len(live), _STEPS_PER_QUERY):
            chunk = live[i:i + _STEPS_PER_QUERY]
            args: list[Any] = []
            for seq, n in chunk:
                args += (seq, started, n)
            text = c.execute(_next_items_sql(len(chunk)), args).fetchone()[0]
            for seq, idx, overlay, claim in loads(text):
                job_id, task, base, timeout = info[seq]
                params = {**base, **overlay} if overlay else dict(base)
                out.append(Claimed(job_id=job_id, job_seq=seq, index=idx, claim=claim + 1,
                                   task=task, params=params, timeout=timeout))
                span = spans.get(seq)
                if span is None:
                    spans[seq] = [idx, idx]
                elif idx > span[1]:
                    span[1] = idx
                elif idx < span[0]:
                    span[0] = idx
                got[seq] += 1
        # Moved before the next round reads: it must not find these items queued again.
        # A job's claimable items between the first and the last taken are exactly those
        # taken (its next ones in index order, read in this transaction), so one ranged
        # UPDATE a job moves them, not one a row.
        for seq, (first, last) in spans.items():
            moved = c.execute(_MOVE_SPAN, (started, seq, started, first, last)).rowcount
            if moved != got[seq]:  # an invariant: the transaction rolls back
                raise RuntimeError(f"claim of job {seq}: {moved} items moved for "
                                   f"{got[seq]} read")
        short = False
        for seq, n in steps:
            took(seq, n, got[seq])
            if got[seq] < n:
                short = True
            if got[seq]:
                tx.move(seq, "queued", "running", got[seq])
        if not short:
            break
    return out
