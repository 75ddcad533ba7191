"""What runs on a Dask worker for the Dask executor: one item, or a batch of items, each
with its own context, cancel flag, progress and captured output.

Module-level functions, so they pickle by reference: ``bulkrunner`` and the task's module
must be importable on every worker.

A batch registers itself in this worker process while it runs. The server can then take
back the units it has not started yet (:func:`take_back`, run on the workers with
``Client.run``), atomically against the batch moving on to its next unit, and run them
elsewhere: the answer says which ones will not run here, with the outcomes of those that
already ended (so they need not wait for the batch's own end behind a stuck item).
"""

# distributed ships partial type hints: many of its calls are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from distributed import Event, get_worker

from bulkrunner.runtime import Outcome, WorkUnit, run_batch, run_item

log = logging.getLogger("bulkrunner.dask")

_PROGRESS_INTERVAL = 0.2  # a worker sends an item's progress at most this often
_FLAG_POLL = 0.1         # a task's cancel check asks the scheduler at most this often
_REMEMBERED = 4096       # batch keys remembered after they ended, or taken back early


def cancel_event_name(unit: WorkUnit) -> str:
    """Name of the ``distributed.Event`` that cancels this attempt of this item."""
    return f"bulkrunner-cancel-{unit.job_id}-{unit.index}-{unit.claim}"


class _RemoteFlag(threading.Event):
    """The item's cancel flag as seen on a Dask worker.

    :class:`Context` only calls ``is_set()``; here that asks the scheduler for the
    attempt's ``distributed.Event``, at most every ``_FLAG_POLL`` seconds (a check costs a
    round trip, about 0.4 ms on loopback), and nothing at all for tasks that never check.
    ``first``: seconds from the first check (when the unit starts) to the first ask, for a
    unit of a batch: a short item never asks. A unit not started yet needs no flag: the
    batch's units are taken back from the worker instead (see :func:`take_back`).
    """

    def __init__(self, name: str, first: float = 0.0) -> None:
        super().__init__()
        self._name = name
        self._event: Event | None = None
        self._first = first
        self._next: float | None = None if first else 0.0

    def is_set(self) -> bool:
        if super().is_set():
            return True
        now = time.monotonic()
        if self._next is None:  # the unit starts: its clock starts now
            self._next = now + self._first
            return False
        if now >= self._next:
            self._next = now + _FLAG_POLL
            try:
                if self._event is None:
                    self._event = Event(self._name)
                if self._event.is_set():
                    self.set()
            except Exception as e:  # a scheduler hiccup must not fail the task
                log.debug("cancel check for %s failed: %r", self._name, e)
        return super().is_set()


class _WorkerReports:
    """The reporter on a Dask worker: progress and captured output go to the server as Dask
    events on its topic, through the scheduler (which keeps the last 1,000 per topic).

    Progress is throttled to one event per ``_PROGRESS_INTERVAL`` (plus the final 100 %):
    a report dropped by the throttle is superseded by the next one, and the outcome sets
    the final progress anyway. Output arrives in chunks of at most 16 KB (see
    :mod:`bulkrunner.runtime.capture`), each sent before the task's result, so an item's
    log is complete when its outcome is recorded.
    """

    def __init__(self, worker: Any, topic: str) -> None:
        self._worker = worker
        self._topic = topic
        self._next = 0.0

    def __call__(self, key: tuple[int, int], frac: float | None, msg: str | None) -> None:
        now = time.monotonic()
        if now < self._next and frac != 1.0:
            return
        self._next = now + _PROGRESS_INTERVAL
        self._worker.log_event(self._topic, ["progress", key[0], key[1], frac, msg])

    def log(self, key: tuple[int, int], claim: int, text: str) -> None:
        self._worker.log_event(self._topic, ["log", key[0], key[1], claim, text])


def run_on_worker(unit: WorkUnit, topic: str) -> tuple[Outcome, float]:
    """Run one attempt on a Dask worker. Returns its outcome, which names the worker's
    address, and the seconds it ran."""
    worker = get_worker()
    t0 = time.perf_counter()
    out = run_item(unit, _WorkerReports(worker, topic), _RemoteFlag(cancel_event_name(unit)))
    return (Outcome(out.ok, out.result, out.error, worker.address, out.retryable),
            time.perf_counter() - t0)


# ---------------------------------------------------------------------- batches
_lock = threading.Lock()
#: Batches running in this worker process: key -> units started, units allowed, and the
#: outcomes so far as (index, outcome).
_running: dict[str, tuple[list[int], list[tuple[int, Outcome]]]] = {}
#: Batches that ended here (key -> units started), and limits set before a batch started.
_ended: OrderedDict[str, int] = OrderedDict()
_early: OrderedDict[str, int] = OrderedDict()


def _remember(d: OrderedDict[str, int], key: str, value: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > _REMEMBERED:
        d.popitem(last=False)


def run_batch_on_worker(units: Sequence[WorkUnit], topic: str, key: str
                        ) -> tuple[str, list[Outcome | None], float, int]:
    """Run a batch of attempts in order on a Dask worker. Returns the worker's address,
    each unit's outcome (None for one taken back before it started), and the seconds and
    count of the units that ran."""
    worker = get_worker()
    addr = worker.address
    ended: list[tuple[int, Outcome]] = []
    with _lock:
        state = [0, _early.pop(key, len(units))]
        _running[key] = (state, ended)

    def begin(i: int) -> bool:
        with _lock:
            if i >= state[1]:
                return False
            state[0] = i + 1
        return True

    spent = [0.0, 0]

    def done(i: int, outcome: Outcome, seconds: float) -> None:
        spent[0] += seconds
        spent[1] += 1
        out = Outcome(outcome.ok, outcome.result, outcome.error, addr, outcome.retryable)
        with _lock:
            ended.append((i, out))

    flags = [_RemoteFlag(cancel_event_name(u), first=_FLAG_POLL) for u in units]
    try:
        outs = run_batch(units, _WorkerReports(worker, topic), flags=flags, begin=begin,
                         done=done)
    finally:
        with _lock:
            _running.pop(key, None)
            _remember(_ended, key, state[0])
    by_index = dict(ended)
    return (addr, [by_index.get(i) for i in range(len(outs))], spent[0], int(spent[1]))


def take_back(key: str, start: int) -> tuple[str, int, list[tuple[int, Outcome]]]:
    """Take back the units of batch ``key`` from index ``start`` on, those not started yet
    (run on each worker by the server through ``Client.run``). Answers what this worker
    knows: ``("running", n, ended)`` (units from ``n`` on will not run here; ``ended`` are
    the outcomes so far), ``("ended", n, [])`` (it ran here and ended: its result says
    all), or ``("unknown", start, [])`` (not seen here: should it start here later, units
    from ``start`` on are skipped)."""
    with _lock:
        entry = _running.get(key)
        if entry is not None:
            state, ended = entry
            state[1] = max(state[0], min(state[1], start))
            return ("running", state[1], list(ended))
        if key in _ended:
            return ("ended", _ended[key], [])
        _remember(_early, key, min(start, _early.get(key, start)))
        return ("unknown", start, [])


def taken_back(answers: dict[str, Any], start: int, size: int
               ) -> tuple[int, list[tuple[int, Outcome]]]:
    """What the workers' answers to :func:`take_back` (by worker address) mean for a batch
    of ``size`` units: (the index from which its units will run nowhere, the outcomes of
    those that ended meanwhile). An answer that is an error (a worker that went away) says
    nothing."""
    seen = [a for a in answers.values() if isinstance(a, tuple) and len(a) == 3]
    running = [a for a in seen if a[0] == "running"]
    if running:
        return min(a[1] for a in running), [e for a in running for e in a[2]]
    if any(a[0] == "ended" for a in seen):
        return size, []  # it ended: its result tells every unit
    return start, []  # not started anywhere yet: skipped wherever it starts


__all__ = ["cancel_event_name", "run_batch_on_worker", "run_on_worker", "take_back",
           "taken_back"]
