"""The dispatcher's turn: the ends of attempts, the progress and output reported meanwhile,
and the next claims, in one transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bulkrunner.store import claims, transitions
from bulkrunner.store.claims import JobInfo, Planner
from bulkrunner.store.records import Claimed, Finish, JobChange, Tx
from bulkrunner.store.writer import Writer


@dataclass
class Turn:
    """What one dispatcher turn did: the items claimed, what each finish made of its item
    (``queued`` to run again, ``succeeded``, ``failed``, or ``stale`` when ignored), the
    jobs whose state changed, when the earliest retry queued is due (or None), and why the
    progress and output of the turn were dropped (None when they were stored)."""

    claimed: list[Claimed] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    changes: list[JobChange] = field(default_factory=list)
    retry_due: float | None = None
    dropped: str | None = None


def turn(writer: Writer, holds: Callable[[Tx], bool], job_info: JobInfo,
         finishes: Sequence[Finish], n: int,
         backoff: Callable[[int], float] = lambda attempt: 0.0, *,
         progress: Mapping[tuple[int, int], tuple[float | None, str | None]] | None = None,
         logs: Mapping[tuple[int, int, int], str] | None = None,
         planner: Planner | None = None) -> Turn:
    """The dispatcher's turn in one transaction: store ``progress`` and captured output
    (``logs``) reported meanwhile, record ``finishes`` (stale ones, whose item no longer
    runs that claim, are ignored), then claim up to ``n`` queued items: as ``planner``
    decides (the claim policy: which jobs, how many of each), or without one in priority
    then oldest-first order. One commit for all of it instead of one each.

    ``backoff(attempt)`` is the delay before the retry of an item that failed its
    ``attempt``-th attempt and has attempts left. Progress and output that cannot be
    stored are dropped (``Turn.dropped`` says why), never the rest of the turn. Claims are
    made only while ``holds(tx)`` (this process holds the dispatcher lease). When the
    transaction fails, the planner is told to give back what it planned and to count out
    the items it was told were requeued (their finishes come again in a later turn).
    """
    out = Turn()
    if not finishes and n <= 0 and not progress and not logs:
        return out

    def op(tx: Tx) -> list[Claimed]:
        if progress or logs:
            out.dropped = transitions.reports(tx, progress or {}, logs or {})
        if finishes:
            out.retry_due = transitions._finish(tx, finishes, backoff, out.states)
            if planner is not None:
                for f, state in zip(finishes, out.states, strict=True):
                    if state == "queued":
                        planner.requeued(f.job_seq)
        if n <= 0 or not holds(tx):
            return []
        if planner is None:
            return transitions._claim(tx, n)
        planner.begin(n, tx.now)
        return claims.claim_planned(tx, planner.plan, planner.took, tx.now, job_info)

    try:
        out.claimed, out.changes = writer.write_tx(op)
    except BaseException:
        if planner is not None:
            planner.abandon_plan()
        raise
    if planner is not None:
        planner.end_plan()
    return out


__all__ = ["Turn", "turn"]
