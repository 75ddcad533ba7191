"""Adaptive batching: how many items to hand a worker in one message, and how much of a
worker an item in flight takes, from how long each task's items take where they run.

One pipe message, one Dask task or one hand-over to a thread costs more than a short item
itself, so while items are short a worker gets a *batch* of them in one message, sized to
hold about one window of work; long items go one per message, so that progress, logs,
cancel and timeouts stay per item and no item waits behind another. The measure is each
executor's own: the run time of items where they run (on the worker, in the thread), not
the dispatcher's submit-to-outcome time, which also counts the wait in the batch.

What is in flight is counted in workers: a long item takes a whole one, a short one the
share of a worker that one item of ``depth`` messages of ``batch`` items is (see
:meth:`Paces.cost`), so each task's items are claimed at their own cost, and a task of long
items next to one of short items leaves the short one its batches on the workers it does
not hold. An item claimed ahead that waits too long for a worker is given back to the
queue by the dispatcher.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

@dataclass(frozen=True)
class BatchPolicy:
    """The knobs of one executor's batching.

    ``window``: seconds of work one message holds at most; items that take at least half
    of it go one per message. ``max_batch``: items per message at most. ``short``: items
    under this many seconds get a second message queued behind the running one on each
    worker (so the worker never waits for the dispatcher); longer ones do not, so no item
    waits behind another that long. ``cap``: items in flight at most.
    """

    window: float = 0.004
    max_batch: int = 256
    short: float = 0.005
    cap: int = 4096


class Pace:
    """A moving average of item run times, and the batch sizes it gives. Thread-safe:
    observed from worker or supervisor threads, read by the dispatcher."""

    def __init__(self, workers: int, policy: BatchPolicy | None = None) -> None:
        self.workers = max(1, workers)
        self.policy = policy or BatchPolicy()
        self._avg: float | None = None
        self._lock = threading.Lock()

    @property
    def average(self) -> float | None:
        """Seconds one item takes where it runs (a moving average), or None before any."""
        return self._avg

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` items ended, after ``seconds`` of run time in all where they ran."""
        if n <= 0:
            return
        per = max(seconds, 0.0) / n
        # Weighted by items, so a batch of 200 counts as much as 200 single items; a long
        # item still moves the average a lot, which turns batching off at once.
        weight = min(0.5, 0.2 * n) if per < self.policy.window else 0.5
        with self._lock:
            avg = self._avg
            self._avg = per if avg is None else avg + weight * (per - avg)

    def reset(self) -> None:
        """Forget the average: the next items go one per message until measured again."""
        with self._lock:
            self._avg = None

    def batch(self) -> int:
        """Items to put in one message now: 1 for long items or before any was measured."""
        avg, p = self._avg, self.policy
        if avg is None or avg >= p.window / 2:
            return 1
        return max(1, min(p.max_batch, int(p.window / max(avg, 1e-7))))

    def depth(self) -> int:
        """Messages each worker should hold: 2 while items are short, else 1."""
        avg = self._avg
        return 2 if avg is not None and avg < self.policy.short else 1


class Paces:
    """A :class:`Pace` per task: each task's items are batched by their own run times, so
    a task of long items next to one of short items on the same executor does not turn
    the short ones' batching off. Thread-safe like :class:`Pace`."""

    def __init__(self, workers: int, policy: BatchPolicy | None = None) -> None:
        self.workers = max(1, workers)
        self.policy = policy or BatchPolicy()
        self._paces: dict[str, Pace] = {}
        self._lock = threading.Lock()

    def get(self, task: str) -> Pace:
        """The pace of ``task`` (a new one, knowing nothing yet, on first use)."""
        pace = self._paces.get(task)
        if pace is None:
            with self._lock:
                pace = self._paces.setdefault(task, Pace(self.workers, self.policy))
        return pace

    def observe(self, task: str, seconds: float, n: int = 1) -> None:
        """``n`` items of ``task`` ended after ``seconds`` of run time in all."""
        self.get(task).observe(seconds, n)

    def batch(self, task: str) -> int:
        """Items of ``task`` to put in one message now."""
        return self.get(task).batch()

    def reset(self, task: str) -> None:
        """Forget what ``task``'s items took: one per message until measured again."""
        self.get(task).reset()

    def cost(self, task: str) -> float:
        """The share of one worker an item of ``task`` takes while in flight: a whole one
        for long items (or before any was measured), 1 / (batch x depth) while short,
        since a worker then holds ``depth`` messages of ``batch`` items."""
        pace = self.get(task)
        if pace.average is None:
            return 1.0
        return 1.0 / (pace.batch() * pace.depth())


def split(n: int, parts: int, size: int) -> list[int]:
    """Sizes of the batches that ``n`` items go out in: at most ``size`` each, and spread
    over at least ``parts`` batches while there are enough items (so every worker gets
    some)."""
    if n <= 0:
        return []
    size = max(1, min(size, math.ceil(n / max(1, parts))))
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest else [])


def by_task(items: Sequence[T], task: Callable[[T], str]) -> list[list[T]]:
    """``items`` in groups of one task each, in the order each task first appears (and
    each group in its items' order): each task's items are batched by its own pace."""
    groups: dict[str, list[T]] = {}
    for it in items:
        groups.setdefault(task(it), []).append(it)
    return list(groups.values())


__all__ = ["BatchPolicy", "Pace", "Paces", "by_task", "split"]
