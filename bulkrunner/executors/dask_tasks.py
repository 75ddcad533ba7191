"""How the units handed to the Dask executor become Dask tasks, and the records that follow
each unit and each batch while they are in flight.

Long items, and items with a short timeout, go one per task; while a task's items are
short, they go in batches of about :data:`POLICY`'s window of work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from distributed import Client

from bulkrunner.executors.batching import BatchPolicy, Paces, by_task, split
from bulkrunner.runtime import Outcome, WorkUnit

Ident = tuple[tuple[int, int], int]

#: Batches: one Dask task costs about 10 ms of CPU on a 2-core machine, over the scheduler,
#: the worker and this server's client (its graph, its TLS messages, the result's way
#: back), so a batch holds up to 250 ms of work: the task's cost stays under a twentieth of
#: it, and an item waits behind a quarter of a second at most. Each worker has a second
#: batch waiting on the scheduler. Items up to 100 ms also have a second one waiting: an
#: item's way back through the scheduler and the dispatcher takes 10-25 ms, which a worker
#: would spend idle. Nothing handed to Dask is given back by the dispatcher, so the recent
#: rate sets no bound.
POLICY = BatchPolicy(window=0.25, max_batch=500, short=0.1, cap=8192)
#: Units with a timeout shorter than this go one per task: a stuck neighbour keeps the
#: units behind it waiting until its batch counts as stuck (see STUCK), up to about 5 s
#: for a batch of 250 ms of work, before they are taken back.
BATCH_TIMEOUT_MIN = 10.0
#: A batch still running after this long, or after 20 times what its items should take
#: (whichever is longer), has the units it has not started taken back and handed out
#: again.
STUCK = 1.0


@dataclasses.dataclass(eq=False)
class Inflight:
    """One unit handed to Dask: its own future, and the Dask task it travels in."""

    unit: WorkUnit
    future: Future[Outcome]
    dask_future: Any
    client: Client
    batch: Batch | None = None  # the batch it travels in now, if any
    index: int = 0              # its place in that batch

    @property
    def ident(self) -> Ident:
        """(item key, claim): the attempt it is."""
        return (self.unit.key, self.unit.claim)


@dataclasses.dataclass(eq=False)
class Batch:
    """One Dask task of several units (``key`` is the task's key)."""

    key: str
    items: list[Inflight]
    dask_future: Any
    client: Client
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    taking_back: bool = False


def plan(items: Sequence[Inflight], paces: Paces, idle: int, single: bool = False
         ) -> tuple[list[Inflight], list[list[Inflight]]]:
    """(the units to go one per task, the batches of the rest). ``single``: all one per
    task. Each task's units are batched by its own pace; ``idle`` is how many workers have
    no batch yet, over which the batches are spread while there are enough units.

    Spreading only over idle workers keeps batches whole: a batch that ends frees one
    worker, and its successors go out as one batch again (split over every worker each
    time, batches would halve until they held one item each).
    """
    alone: list[Inflight] = []
    batches: list[list[Inflight]] = []
    for group in by_task(items, lambda it: it.unit.task):
        size = 1 if single else paces.batch(group[0].unit.task)
        rest: list[Inflight] = []
        for it in group:
            (alone if size == 1 or 0 < it.unit.timeout < BATCH_TIMEOUT_MIN
             else rest).append(it)
        start = 0
        for n in split(len(rest), max(1, idle), size):
            batches.append(rest[start:start + n])
            start += n
    return alone, batches


__all__ = ["BATCH_TIMEOUT_MIN", "POLICY", "STUCK", "Batch", "Ident", "Inflight", "plan"]
