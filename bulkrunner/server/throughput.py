"""How fast each job's items finish lately, for the job page's chart, its rate and ETA.

A listener on the event bus counts finished items per job in buckets of
:data:`BUCKET` seconds, for the last :data:`KEPT` buckets of the :data:`JOBS` jobs that
finished items most recently: memory stays bounded however many jobs there are. It counts
what this server ran since it started.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from bulkrunner.server.events import EventBus, Finished

BUCKET = 2.0     # seconds per bucket
KEPT = 300       # buckets kept per job: ten minutes
JOBS = 128       # jobs followed at once (the most recently active)
_RATE_WINDOW = 30.0  # the current rate is over this many seconds


class Throughput:
    """Finished items per job and interval."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, deque[list[float]]] = OrderedDict()
        self._first: dict[str, float] = {}
        self._lock = threading.Lock()

    def subscribe(self, events: EventBus) -> None:
        """Count every attempt that ended its item (succeeded or failed)."""
        events.subscribe_all(Finished, self._on_finished)

    def _on_finished(self, events: Sequence[Finished]) -> None:
        by_job: dict[str, int] = {}
        for e in events:
            if e.state in ("succeeded", "failed"):
                by_job[e.job_id] = by_job.get(e.job_id, 0) + 1
        if not by_job:
            return
        now = time.time()
        start = now - now % BUCKET
        with self._lock:
            for job_id, n in by_job.items():
                buckets = self._jobs.get(job_id)
                if buckets is None:
                    buckets = self._jobs[job_id] = deque(maxlen=KEPT)
                    self._first[job_id] = now
                    if len(self._jobs) > JOBS:
                        old, _ = self._jobs.popitem(last=False)
                        self._first.pop(old, None)
                else:
                    self._jobs.move_to_end(job_id)
                if buckets and buckets[-1][0] == start:
                    buckets[-1][1] += n
                else:
                    buckets.append([start, n])

    def of(self, job_id: str, now: float | None = None) -> dict[str, Any]:
        """``{"interval", "history": [[bucket start, finished], ...], "rate"}`` for a job:
        the buckets oldest first (empty ones included), and items per second over the
        last half minute (None when nothing finished here lately)."""
        now = time.time() if now is None else now
        with self._lock:
            buckets = [list(b) for b in self._jobs.get(job_id, ())]
            first = self._first.get(job_id)
        history: list[list[float]] = []
        for start, n in buckets:
            while history and history[-1][0] + BUCKET < start:
                history.append([history[-1][0] + BUCKET, 0])
            history.append([start, n])
        rate = None
        if first is not None and history:
            since = max(now - _RATE_WINDOW, first)
            span = max(now - since, BUCKET)
            recent = sum(n for start, n in history if start + BUCKET > since)
            rate = recent / span if now - history[-1][0] < _RATE_WINDOW + BUCKET else 0.0
        return {"interval": BUCKET, "history": history, "rate": rate}


__all__ = ["BUCKET", "Throughput"]
