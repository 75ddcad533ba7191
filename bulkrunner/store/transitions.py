"""How items move: the dispatcher's claims and the end of attempts, inside a transaction."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from bulkrunner.store.records import Claimed, Finish, Tx, _loads

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


def backoff_delay(base: float, cap: float) -> Callable[[int], float]:
    """Exponential backoff with equal jitter: after attempt n, wait in [d/2, d] where
    d = min(cap, base * 2**(n-1))."""
    def delay(attempt: int) -> float:
        d = min(cap, base * (2.0 ** max(attempt - 1, 0)))
        return float(d / 2 + random.random() * d / 2)
    return delay
