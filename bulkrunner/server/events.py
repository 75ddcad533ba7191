"""The server's one event bus: typed events, emitted once, that listeners subscribe to.

Metrics, the server log (and later webhooks and the web page) subscribe here instead of
hooking into the service, the dispatcher or the store. A listener runs on the thread that
emits (a request thread for :class:`Submitted`, the dispatcher thread for the rest), so it
must be quick and must not block; one that raises is logged and the others still run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from bulkrunner.models import Job
from bulkrunner.store import JobChange

log = logging.getLogger("bulkrunner.events")


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job was accepted (its 202 is committed)."""

    job: Job


@dataclass(slots=True)
class Started:
    """An attempt was handed to the executor."""

    job_id: str
    job_seq: int
    index: int
    claim: int
    task: str


@dataclass(slots=True)
class Finished:
    """An attempt ended and its end is recorded.

    ``state`` is what the item became: ``queued`` (to run again), ``succeeded``, ``failed``,
    or ``stale`` when the store ignored the outcome (the item was cancelled or claimed again
    meanwhile). ``charged`` is False for an innocent item re-queued without spending an
    attempt; ``cause`` is ``timeout`` or ``worker_died`` when that is how it ended.
    ``duration`` is the attempt's run time in seconds, from hand-over to outcome.
    """

    job_id: str
    job_seq: int
    index: int
    claim: int
    task: str
    ok: bool
    state: str
    charged: bool
    duration: float
    cause: str | None = None


@dataclass(frozen=True, slots=True)
class JobChanged:
    """A job moved from one state to another (``counts`` are its item counts after)."""

    job_id: str
    task: str
    old: str
    new: str
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class Recovered:
    """At start-up, items a stopped server left running were re-queued or failed."""

    requeued: int
    failed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Notified:
    """An attempt to deliver a finished job's webhook ended. ``outcome`` is ``delivered``
    (a 2xx answer), ``retrying`` (it is tried again later) or ``failed`` (no attempts
    left); ``status`` is the HTTP status, None when no answer came."""

    job_id: str
    url: str
    outcome: str
    attempts: int
    status: int | None


Event = Submitted | Started | Finished | JobChanged | Recovered | Notified
E = TypeVar("E", Submitted, Started, Finished, JobChanged, Recovered, Notified)


class EventBus:
    """Listeners by event type; ``emit`` calls each listener of the event's type in turn."""

    def __init__(self) -> None:
        self._listeners: dict[type[Any], tuple[Callable[[Any], None], ...]] = {}
        self._batch_listeners: dict[type[Any], tuple[Callable[[Any], None], ...]] = {}
        self._lock = threading.Lock()

    def subscribe(self, kind: type[E], listener: Callable[[E], None]) -> None:
        """Call ``listener(event)`` for every event of type ``kind`` from now on."""
        with self._lock:  # copy on write: emit reads without the lock
            self._listeners[kind] = (*self._listeners.get(kind, ()), listener)

    def subscribe_all(self, kind: type[E], listener: Callable[[Sequence[E]], None]) -> None:
        """Call ``listener(events)`` with the events of type ``kind`` that are emitted
        together (:meth:`emit_all`: a turn's hundreds of ends), or with a list of one.
        For listeners that count: one call a turn instead of one an item."""
        with self._lock:
            self._batch_listeners[kind] = (*self._batch_listeners.get(kind, ()), listener)

    def wants(self, kind: type[Any]) -> bool:
        """Whether anyone listens to ``kind`` (to skip building events nobody reads)."""
        return kind in self._listeners or kind in self._batch_listeners

    def job_changes(self, changes: Iterable[JobChange]) -> None:
        """Emit a :class:`JobChanged` for each change of state the store reported."""
        for ch in changes:
            self.emit(JobChanged(ch.id, ch.task, ch.old, ch.new, ch.counts))

    def emit(self, event: Event) -> None:
        """Hand ``event`` to its listeners; a failing listener is logged, never raised."""
        for listener in self._listeners.get(type(event), ()):
            self._call(listener, event, type(event))
        for listener in self._batch_listeners.get(type(event), ()):
            self._call(listener, [event], type(event))

    def emit_all(self, kind: type[E], events: Sequence[E]) -> None:
        """Hand ``events``, all of type ``kind``, to the listeners of ``kind``: each one to
        those of :meth:`subscribe`, all in one list to those of :meth:`subscribe_all`."""
        if not events:
            return
        for listener in self._listeners.get(kind, ()):
            for event in events:
                self._call(listener, event, kind)
        for listener in self._batch_listeners.get(kind, ()):
            self._call(listener, events, kind)

    @staticmethod
    def _call(listener: Callable[[Any], None], arg: Any, kind: type[Any]) -> None:
        try:
            listener(arg)
        except Exception:  # one listener's bug must not stop the emitter or the rest
            log.exception("event listener %r failed on %s", listener, kind.__name__)


__all__ = ["Event", "EventBus", "Finished", "JobChanged", "Notified", "Recovered", "Started",
           "Submitted"]
