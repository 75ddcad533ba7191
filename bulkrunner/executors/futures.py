"""The futures executors hand out for units: plain ``concurrent.futures.Future`` objects,
made cheap to create and to ask about, since a turn of short items makes hundreds.

- The futures of one hand-over share one condition (a ``Future`` builds a Condition and a
  re-entrant lock of its own, which costs more than a short item's run). A shared
  condition wakes every waiter when any of them settles, so :meth:`UnitFuture.result` and
  :meth:`UnitFuture.exception` wait in a loop until their own future is done.
- ``running()``, ``done()`` and ``cancelled()`` read the state without taking the
  condition (one attribute read; the dispatcher asks them of every unit in flight).

Everything else (settling, cancelling, callbacks, ``concurrent.futures.wait``) is the
stdlib's own code on the same attributes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)

from bulkrunner.runtime import Outcome

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))


class UnitFuture(Future[Outcome]):
    """A unit's future; ``condition`` is shared by the futures of one hand-over (a
    re-entrant one: ``concurrent.futures.wait`` takes each future's in turn)."""

    def __init__(self, condition: threading.Condition | None = None) -> None:
        # The fields Future.__init__ sets, with the condition given instead of a new one.
        self._condition = condition if condition is not None else threading.Condition()
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[Outcome]], object]] = []

    def running(self) -> bool:
        """True while a worker runs the unit (read without the condition)."""
        return self._state == RUNNING

    def done(self) -> bool:
        """True once settled or cancelled (read without the condition)."""
        return self._state in _DONE

    def cancelled(self) -> bool:
        """True once cancelled (read without the condition)."""
        return self._state in _CANCELLED

    def _wait(self, timeout: float | None) -> None:
        if self._state in _DONE:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._state not in _DONE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._condition.wait(left)

    def result(self, timeout: float | None = None) -> Outcome:
        """The outcome, waiting up to ``timeout`` seconds for it (as ``Future.result``)."""
        if self._state == FINISHED and self._exception is None:
            # Settled: the result was set before the state, under the condition.
            return self._result  # type: ignore[return-value]
        self._wait(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception, waiting up to ``timeout`` seconds (as ``Future.exception``)."""
        self._wait(timeout)
        return super().exception(timeout=0)


def unit_futures(n: int) -> list[UnitFuture]:
    """``n`` futures sharing one condition."""
    cond = threading.Condition()
    return [UnitFuture(cond) for _ in range(n)]


def settle(fut: Future[Outcome], result: Outcome | BaseException) -> None:
    """Settle ``fut`` with ``result``, an Outcome or the error it raises, unless it is done
    (also when another thread settles or cancels it meanwhile: the first one counts)."""
    if fut.done():
        return
    try:
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    except InvalidStateError:  # settled meanwhile: nothing to tell
        pass


def add_done_callbacks(futs: Sequence[Future[Outcome]],
                       fn: Callable[[Future[Outcome]], object]) -> None:
    """``fut.add_done_callback(fn)`` for each of ``futs``, taking each shared condition
    once for a run of futures that share it (one a hand-over) rather than once a future.
    As there, ``fn`` is called at once for a future already done."""
    cond: threading.Condition | None = None
    done: list[Future[Outcome]] = []
    try:
        for f in futs:
            c = f._condition  # the stdlib's own attribute
            if c is not cond:
                if cond is not None:
                    cond.release()
                cond = None
                c.acquire()
                cond = c
            if f._state in _DONE:
                done.append(f)
            else:
                f._done_callbacks.append(fn)  # type: ignore[attr-defined]
    finally:
        if cond is not None:
            cond.release()
    for f in done:
        f.add_done_callback(fn)  # calls it now, logging what it raises


__all__ = ["UnitFuture", "add_done_callbacks", "settle", "unit_futures"]
