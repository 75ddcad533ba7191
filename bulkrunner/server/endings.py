"""How the end of an attempt is written down: from its outcome, from a worker that died
under it, from an executor that lost it, from its timeout, or for an item never started.

Each end is an :class:`Ended`: the store's :class:`~bulkrunner.store.Finish` and what the
``Finished`` event of the turn that records it will say.
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

from bulkrunner.executors import ExecutorLost, WorkerDied
from bulkrunner.runtime import Outcome, WorkUnit
from bulkrunner.store import Claimed, Finish

log = logging.getLogger("bulkrunner.dispatcher")


@dataclass(slots=True)
class Ended:
    """An attempt's end waiting to be recorded, with what its event will say."""

    finish: Finish
    job_id: str
    task: str
    duration: float
    cause: str | None = None


def from_future(unit: WorkUnit, fut: Future[Outcome], took: float) -> Ended:
    """The end of ``unit``'s attempt as its executor's future settled it, ``took`` seconds
    after its hand-over. A worker that died fails the item (``worker_died``); an executor
    that lost it, or took it back, re-queues it without spending an attempt."""
    seq, idx, claim = unit.job_seq, unit.index, unit.claim
    try:
        out = fut.result()
    except WorkerDied as e:
        return Ended(Finish(seq, idx, claim, error={
            "type": "WorkerDied", "message": str(e), "traceback": ""}),
            unit.job_id, unit.task, took, "worker_died")
    except (ExecutorLost, CancelledError):
        return Ended(Finish(seq, idx, claim, charge=False), unit.job_id, unit.task, took)
    except Exception as e:  # an executor error that names no culprit: not the item's
        log.warning("item %s of job %s lost by the executor: %r", unit.index, unit.job_id, e)
        return Ended(Finish(seq, idx, claim, charge=False), unit.job_id, unit.task, took)
    return Ended(Finish(seq, idx, claim, ok=out.ok, result=out.result, error=out.error,
                        worker=out.worker, retryable=out.retryable),
                 unit.job_id, unit.task, took)


def timed_out(unit: WorkUnit, took: float) -> Ended:
    """The end of an attempt that passed its timeout (its worker is told to stop)."""
    return Ended(Finish(unit.job_seq, unit.index, unit.claim, error={
        "type": "TimeoutError",
        "message": f"the attempt passed its timeout of {unit.timeout:g} s",
        "traceback": ""}), unit.job_id, unit.task, took, "timeout")


def not_started(c: Claimed) -> Ended:
    """A claimed item that could not be handed over: back to the queue, free of charge."""
    return Ended(Finish(c.job_seq, c.index, c.claim, charge=False), c.job_id, c.task, 0.0)


def unknown_task(c: Claimed) -> Ended:
    """A claimed item whose task is no longer in the config: it fails, and says why."""
    return Ended(Finish(c.job_seq, c.index, c.claim, retryable=False, error={
        "type": "UnknownTask", "message": f"the task {c.task!r} is no longer in the config; "
        "add it back and retry the job", "traceback": ""}), c.job_id, c.task, 0.0)


__all__ = ["Ended", "from_future", "not_started", "timed_out", "unknown_task"]
