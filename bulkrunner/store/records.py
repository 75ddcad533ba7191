"""The records the store takes and gives, and the transaction context of a write."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bulkrunner.models import STATES, derive_state
from bulkrunner.store.outbox import queue_delivery


@dataclass
class NewJob:
    """A validated submission, ready to insert. ``params_text`` is ``params`` as the JSON
    text to store (encoded once, when it was checked); ``items`` are JSON texts (None: no
    overlay)."""

    id: str
    task: str
    params: dict[str, Any]
    items: Sequence[str | None]
    priority: int = 0
    max_attempts: int = 1
    timeout: float = 0.0
    key: str | None = None
    body_hash: str | None = None
    params_text: str = ""
    #: No item starts before this time (``time.time()``); None = at once.
    run_after: float | None = None
    #: The name of the token that submitted it; the schedule that did; its webhook URL.
    submitted_by: str | None = None
    schedule: str | None = None
    notify_url: str | None = None

    def __post_init__(self) -> None:
        if not self.params_text:
            self.params_text = json.dumps(self.params)


@dataclass(slots=True)
class Claimed:
    """An item the dispatcher has just moved to ``running``."""

    job_id: str
    job_seq: int
    index: int
    claim: int
    task: str
    params: dict[str, Any]
    timeout: float


@dataclass(slots=True)
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


def _state_sql(delta: str = ":") -> str:
    """:func:`~bulkrunner.models.derive_state` in SQL, over the counts after the deltas
    (in an UPDATE every expression sees the row as it was, so each count is old + delta).
    A job that finishes is no longer paused (set beside it): a retry later runs it, where
    its re-queued items would otherwise wait for a resume nobody knows is needed.
    ``delta`` prefixes each delta's name: ``:`` for parameters, ``d.`` for a joined row."""
    q, r, s, f, c = (f"(n_{n} + {delta}{n})" for n in STATES)
    return (f"CASE WHEN paused = 1 AND ({q} > 0 OR {r} > 0) THEN 'paused' "
            f"WHEN {q} > 0 OR {r} > 0 THEN CASE WHEN {r} > 0 OR {s} + {f} + {c} > 0 "
            f"THEN 'running' ELSE 'queued' END WHEN {c} > 0 THEN 'cancelled' "
            f"WHEN {f} > 0 THEN 'failed' ELSE 'succeeded' END")


_STATE = _state_sql()
_APPLY = (
    "UPDATE jobs SET " + ", ".join(f"n_{n} = n_{n} + :{n}" for n in STATES) +
    f", state = {_STATE}, "
    "started_at = CASE WHEN started_at IS NULL AND :running > 0 THEN :now "
    "ELSE started_at END, "
    f"finished_at = CASE WHEN {_STATE} IN ('succeeded', 'failed', 'cancelled') "
    "THEN COALESCE(finished_at, :now) ELSE NULL END, "
    f"paused = CASE WHEN {_STATE} IN ('succeeded', 'failed', 'cancelled') THEN 0 "
    "ELSE paused END "
    "WHERE seq = :seq RETURNING id, task, paused, " + ", ".join(f"n_{n}" for n in STATES) +
    ", notify_url")


_MANY_STATE = _state_sql("d.")
#: The same for many jobs in one statement: the deltas come as a JSON array of
#: [seq, queued, running, succeeded, failed, cancelled] rows (a dispatcher turn under fair
#: share touches a job per item; one statement each was most of such a turn's time).
_APPLY_MANY = (
    "UPDATE jobs SET " + ", ".join(f"n_{n} = n_{n} + d.{n}" for n in STATES) +
    f", state = {_MANY_STATE}, "
    "started_at = CASE WHEN started_at IS NULL AND d.running > 0 THEN :now "
    "ELSE started_at END, "
    f"finished_at = CASE WHEN {_MANY_STATE} IN ('succeeded', 'failed', 'cancelled') "
    "THEN COALESCE(finished_at, :now) ELSE NULL END, "
    f"paused = CASE WHEN {_MANY_STATE} IN ('succeeded', 'failed', 'cancelled') THEN 0 "
    "ELSE paused END "
    "FROM (SELECT value->>0 AS seq, " +
    ", ".join(f"value->>{i + 1} AS {n}" for i, n in enumerate(STATES)) +
    " FROM json_each(:deltas)) AS d WHERE jobs.seq = d.seq "
    "RETURNING seq, id, task, paused, " + ", ".join(f"n_{n}" for n in STATES) + ", notify_url")


def _apply_counts(tx: Tx) -> None:
    """Write the item-count deltas of ``tx`` to their jobs and derive each job's state, in
    one statement (it returns the new counts, so nothing is read first)."""
    moved = {seq: d for seq, d in tx.counts.items() if any(d.values())}
    if len(moved) == 1:
        ((seq, delta),) = moved.items()
        row = tx.conn.execute(_APPLY, {**delta, "now": tx.now, "seq": seq}).fetchone()
        rows = [(seq, *row)] if row is not None else []
    elif moved:
        deltas = json.dumps([[seq, *(d[n] for n in STATES)] for seq, d in moved.items()])
        got = {r[0]: r for r in tx.conn.execute(_APPLY_MANY, {"now": tx.now,
                                                             "deltas": deltas})}
        rows = [got[seq] for seq in moved if seq in got]  # in the order the jobs moved
    else:
        rows = []
    for seq, *row in rows:
        delta = moved[seq]
        counts = dict(zip(STATES, row[3:8], strict=True))
        old = {s: counts[s] - delta[s] for s in STATES}
        before, after = derive_state(old, bool(row[2])), derive_state(counts, bool(row[2]))
        by_task = tx.by_task[row[1]]
        for s, n in delta.items():
            by_task[s] += n
        if before is not after:
            tx.changes.append(JobChange(row[0], row[1], before.value, after.value, counts))
            if after.finished and row[8] is not None:
                # In the transaction that ends the job: a kill right after loses nothing.
                queue_delivery(tx.conn, seq, row[8], tx.now)
    tx.counts.clear()


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
