"""What the Dask executor and its workers say besides tasks and results, and what Dask's
own failures say in an item's error (:func:`killed_message`, :func:`dask_failed`).

Progress reports and captured output travel worker -> scheduler -> server as Dask events
on a topic private to this server (:func:`report_topic`), handed to the server's reporter
by :func:`report_handler`. Cooperative cancel is a ``distributed.Event`` per attempt that
the item's :class:`~bulkrunner.runtime.Context` polls while the task checks it; the
server sets it and, once nobody can be polling it any more, clears it
(:class:`CancelEvents`).
"""

# distributed ships partial type hints: many of its calls are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from distributed import Client, Event, KilledWorker

from bulkrunner.executors.dask_worker import cancel_event_name
from bulkrunner.runtime import Outcome, Reporter, WorkUnit, error_dict

log = logging.getLogger("bulkrunner.dask")

_EVENT_TTL = 600.0       # seconds before a cancel Event that was set is cleared again


def report_topic(store_path: str) -> str:
    """The event topic of this server's reports.

    Private to this server, so that servers sharing a scheduler never see each other's
    reports (item keys are only unique within one database); the same after a restart,
    because the scheduler keeps up to 1,000 events per topic."""
    ident = f"{socket.gethostname()}:{os.path.abspath(store_path)}"
    return f"bulkrunner-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def report_handler(reporter: Reporter | None) -> Callable[[tuple[float, Any]], None]:
    """What the client calls with each event of the topic: progress and output go to
    ``reporter`` (and its ``log``); a malformed event is logged and dropped."""
    sink = getattr(reporter, "log", None)

    def on_event(event: tuple[float, Any]) -> None:
        # Runs on the client's event loop: the reporter only updates dicts under a lock.
        if reporter is None:
            return
        try:
            kind, seq, index, *rest = event[1]
            if kind == "progress":
                reporter((int(seq), int(index)), rest[0], rest[1])
            elif kind == "log" and sink is not None:
                sink((int(seq), int(index)), int(rest[0]), str(rest[1]))
        except Exception:
            log.exception("bad event from a Dask worker: %.200r", event)

    return on_event


class CancelEvents:
    """The cancel Events this server has set, each cleared again after ``_EVENT_TTL``
    seconds (the scheduler would keep them all otherwise). One thread sets them (the
    executor's abort thread) and one clears them (its watcher): the deque's append and
    popleft need no lock between the two."""

    def __init__(self) -> None:
        self._set: deque[tuple[float, str]] = deque()

    def set(self, unit: WorkUnit, client: Client) -> None:
        """Set the Event of ``unit``'s attempt (a blocking call to the scheduler)."""
        name = cancel_event_name(unit)
        Event(name, client=client).set()
        self._set.append((time.monotonic(), name))

    def clear_old(self, client: Client | None) -> None:
        """Clear the Events set more than ``_EVENT_TTL`` seconds ago (through ``client``,
        while it runs; else they are forgotten: a new client's scheduler has none)."""
        while self._set and time.monotonic() - self._set[0][0] > _EVENT_TTL:
            _, name = self._set.popleft()
            if client is not None and client.status == "running":
                try:
                    Event(name, client=client).clear()
                except Exception as e:
                    log.debug("clearing %s: %r", name, e)


def killed_message(e: KilledWorker) -> str:
    """The error message of an item whose every worker died under it."""
    last = getattr(e, "last_worker", None)
    where = getattr(last, "address", last)
    tries = getattr(e, "allowed_failures", None)
    return (f"the Dask worker running this item died (last on {where}), and so did every "
            f"worker Dask re-ran it on ({tries} re-runs allowed: "
            "distributed.scheduler.allowed-failures); out of memory, a crash in native "
            "code, or the task killed its worker")


def dask_failed(e: BaseException) -> Outcome:
    """The outcome of an item that Dask failed to run.

    run_item turns the task's own errors (an unimportable task module included) into an
    Outcome, so this is Dask failing around it: the result cannot be unpickled here, a
    task that raised a BaseException, an error of Dask's own. It charges an attempt with
    the reason in the item's error rather than re-queueing the item for ever."""
    err = error_dict(e)
    err["message"] = f"Dask could not run the item: {err['message']}"
    return Outcome(ok=False, error=err)


__all__ = ["CancelEvents", "dask_failed", "killed_message", "report_handler", "report_topic"]
