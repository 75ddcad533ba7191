"""How items move: the dispatcher's claims and the end of attempts, inside a transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bulkrunner.store.faults import unwritable
from bulkrunner.store.records import Claimed, Finish, Tx, _loads

_SUCCEED = ("UPDATE items SET state = 'succeeded', attempts = attempts + 1, result = ?, "
            "error = NULL, worker = ?, finished_at = ?, progress = 1 "
            "WHERE job_seq = ? AND idx = ? AND state = 'running' AND claim = ?")
# Many successes in one statement, from a JSON array of [job_seq, idx, claim, result,
# worker]. One statement is one step into SQLite, and each step lets go of the interpreter:
# an ``executemany`` of a row a step waits to get it back once per row, behind whatever
# other thread runs Python meanwhile (an item thread, a process pool's reader), up to the
# switch interval each time. Measured with one other busy thread: 5 ms an item against
# 0.15 ms for this.
_SUCCEED_MANY = (
    "UPDATE items SET state = 'succeeded', attempts = attempts + 1, result = f.result, "
    "error = NULL, worker = f.worker, finished_at = ?, progress = 1 "
    "FROM (SELECT value ->> 0 AS seq, value ->> 1 AS idx, value ->> 2 AS claim, "
    "value ->> 3 AS result, value ->> 4 AS worker FROM json_each(?)) AS f "
    "WHERE items.job_seq = f.seq AND items.idx = f.idx AND items.state = 'running' "
    "AND items.claim = f.claim")
#: Characters of results sent in one statement at most (a bigger batch takes several).
_SUCCEED_TEXT = 1 << 20


def _claim(tx: Tx, n: int) -> list[Claimed]:
    c = tx.conn
    rows = c.execute(
        # Job by job in claim order (jobs_waiting), then each job's items in index order.
        "SELECT i.job_seq, i.idx, i.params, i.claim, j.id, j.task, j.params, j.timeout "
        "FROM jobs j INDEXED BY jobs_waiting "
        "JOIN items i INDEXED BY items_queued ON i.job_seq = j.seq AND i.state = 'queued' "
        "WHERE j.n_queued > 0 AND j.doomed = 0 AND i.not_before <= ? "
        "ORDER BY j.priority DESC, j.seq, i.idx LIMIT ?", (tx.now, n)).fetchall()
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


#: Successes in a turn from which they are recorded together (``_SUCCEED_MANY``), not
#: one by one.
_BATCH_FROM = 8


def _succeed_all(tx: Tx, finishes: Sequence[Finish]) -> bool:
    """Record every success of ``finishes`` in one statement (or a few, past
    ``_SUCCEED_TEXT`` of results); True when each matched its running item. When one did
    not (a stale outcome: cancelled, timed out, claimed again), nothing of it stays, and
    the caller records them one by one instead."""
    ok = [f for f in finishes if f.ok and f.charge]
    if len(ok) < _BATCH_FROM:
        return False
    c = tx.conn
    now = tx.now
    c.execute("SAVEPOINT succeed_all")
    n = 0
    rows: list[list[Any]] = []
    size = 0
    for f in ok:
        rows.append([f.job_seq, f.index, f.claim, f.result, f.worker])
        size += len(f.result or "")
        if size >= _SUCCEED_TEXT:
            n += c.execute(_SUCCEED_MANY, (now, json.dumps(rows))).rowcount
            rows, size = [], 0
    if rows:
        n += c.execute(_SUCCEED_MANY, (now, json.dumps(rows))).rowcount
    if n != len(ok):
        c.execute("ROLLBACK TO succeed_all")
        c.execute("RELEASE succeed_all")
        return False
    c.execute("RELEASE succeed_all")
    per_job: dict[int, int] = {}
    for f in ok:
        per_job[f.job_seq] = per_job.get(f.job_seq, 0) + 1
    for seq, k in per_job.items():
        tx.move(seq, "running", "succeeded", k)
    return True


def _finish(tx: Tx, finishes: Sequence[Finish], backoff: Callable[[int], float],
            outcome: list[str]) -> float | None:
    """Record ended attempts; ``outcome`` gets what each made of its item, in order.

    Returns when the earliest retry queued here is due (``time.time()``), or None.
    """
    c = tx.conn
    due: float | None = None
    batched = _succeed_all(tx, finishes)
    for f in finishes:
        if f.ok and f.charge and batched:
            outcome.append("succeeded")
            continue
        if f.ok and f.charge:
            # The common case in one guarded UPDATE, no read first: a stale outcome (the
            # item was cancelled, timed out or claimed again) matches no row.
            cur = c.execute(_SUCCEED, (f.result, f.worker, tx.now, f.job_seq, f.index,
                                       f.claim))
            if cur.rowcount:
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
        not_before = tx.now + backoff(attempts) if again else 0.0
        if again and (due is None or not_before < due):
            due = not_before
        c.execute("UPDATE items SET state = ?, attempts = ?, error = ?, errors = ?, "
                  "worker = ?, not_before = ?, finished_at = ?, "
                  "started_at = CASE WHEN ? THEN NULL ELSE started_at END "
                  "WHERE job_seq = ? AND idx = ?",
                  (new_state, attempts, json.dumps(error), json.dumps(history),
                   f.worker, not_before,
                   None if again else tx.now, again, f.job_seq, f.index))
        tx.move(f.job_seq, "running", new_state)
        outcome.append(new_state)
    return due


def requeue_running(tx: Tx, interrupted: bool, max_interruptions: int
                    ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Put every running item back in the queue, never spending an attempt.

    With ``interrupted`` (start-up after a crash) each counts an interruption, and an item
    interrupted ``max_interruptions`` times fails instead. Returns the counts
    ``{"requeued": n, "failed": m}`` and the same for each job id.
    """
    c = tx.conn
    # The partial index of running items, named: else a scan of every item stored.
    rows = c.execute("SELECT i.job_seq, i.idx, i.interruptions, j.id "
                     "FROM items i INDEXED BY items_running "
                     "JOIN jobs j ON j.seq = i.job_seq "
                     "WHERE i.state = 'running'").fetchall()
    out = {"requeued": 0, "failed": 0}
    per_job: dict[str, dict[str, int]] = {}
    for seq, idx, n, job_id in rows:
        mine = per_job.setdefault(job_id, {"requeued": 0, "failed": 0})
        n = n + 1 if interrupted else n
        if n >= max_interruptions:
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
    return out, per_job


def reports(tx: Tx, progress: Mapping[tuple[int, int], tuple[float | None, str | None]],
            logs: Mapping[tuple[int, int, int], str]) -> str | None:
    """Store progress and captured output. If they cannot all be stored, each item's are
    tried on their own and only those that fail are dropped (their reason is returned):
    one item's bad report never holds up the others, nor the rest of the transaction."""
    def both() -> None:
        record_progress(tx, progress)
        append_logs(tx, logs)

    if _saved(tx, both) is None:
        return None
    reasons: list[str] = []
    for key, value in progress.items():
        why = _saved(tx, lambda: record_progress(tx, {key: value}))  # noqa: B023
        if why:
            reasons.append(f"progress of item {key[1]} of job #{key[0]}: {why}")
    for lkey, text in logs.items():
        why = _saved(tx, lambda: append_logs(tx, {lkey: text}))  # noqa: B023
        if why:
            reasons.append(f"output of item {lkey[1]} of job #{lkey[0]}: {why}")
    return "; ".join(reasons) or None


def _saved(tx: Tx, fn: Callable[[], object]) -> str | None:
    """Run ``fn`` in a savepoint; on a storage error undo it and return the reason."""
    c = tx.conn
    c.execute("SAVEPOINT reports")
    try:
        fn()
    except (sqlite3.Error, UnicodeError, ValueError, OverflowError) as e:
        if unwritable(e) is not None:
            raise  # a full disk or a lock is not the report's fault: the turn is retried
        c.execute("ROLLBACK TO reports")
        c.execute("RELEASE reports")
        return repr(e)
    c.execute("RELEASE reports")
    return None


def append_logs(tx: Tx, chunks: Mapping[tuple[int, int, int], str]) -> None:
    """Append captured output, keyed by (job sequence number, item index, claim); chunks
    of jobs deleted (or being deleted) meanwhile are dropped."""
    tx.conn.executemany(
        "INSERT INTO logs (job_seq, idx, claim, text) SELECT ?, ?, ?, ? "
        "WHERE EXISTS (SELECT 1 FROM jobs WHERE seq = ? AND doomed = 0)",
        ((seq, idx, claim, text, seq) for (seq, idx, claim), text in chunks.items()))


def record_progress(tx: Tx, updates: Mapping[tuple[int, int], tuple[float | None, str | None]]
                    ) -> None:
    """Store the latest progress and message of running items (and the job's message)."""
    c = tx.conn
    for (seq, idx), (frac, msg) in updates.items():
        c.execute("UPDATE items SET progress = COALESCE(?, progress), "
                  "message = COALESCE(?, message) "
                  "WHERE job_seq = ? AND idx = ? AND state = 'running'",
                  (frac, msg, seq, idx))
        if msg is not None:
            c.execute("UPDATE jobs SET message = ? WHERE seq = ?", (msg, seq))
