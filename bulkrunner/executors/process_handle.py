"""The server's view of one worker process of the process executor: its handle.

A :class:`WorkerHandle` holds the process, its pipe, the three numbers it shares with the
supervisor (see :mod:`bulkrunner.executors.process_worker`) and the futures of the units
handed to it, in order. It owns what concerns that one worker: starting it
(:func:`spawn`, from :func:`worker_context`), handing it units and taking back those it has
not started (the supervisor's side of their shared lock), the bytes to and from its pipe,
killing it, and, once it is dead, sorting its units into those that fail, those that run
again elsewhere and the one it was running.

Also here, as the pool hands them to its workers: a unit's future (:class:`PoolFuture`),
when the next worker may start after a failed start (:class:`Starts`), and the hand-on of
the progress and output a worker sends (:func:`deliver_reports`).

The pool of workers, its supervisor and its lock are :mod:`bulkrunner.executors.process`'s.
Two things here take that lock, each given it: a future's ``cancel()`` and
:meth:`WorkerHandle.send_units` holding back a batch; a method that needs it held says so.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures._base import PENDING
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from bulkrunner.errors import ExecutorLost, WorkerDied
from bulkrunner.executors.futures import UnitFuture
from bulkrunner.executors.process_worker import (
    HI,
    LO,
    PROTOCOL,
    STARTED,
    read_frames,
    worker_main,
)
from bulkrunner.runtime import Reporter, WorkUnit

log = logging.getLogger("bulkrunner.executors.process")

_READ = 1 << 16
#: Bytes a batch may have to be queued on a busy worker's pipe: it must fit in the socket
#: buffer, or the send would block the supervisor until the worker finishes its item.
_PIPELINE_BYTES = 64 * 1024
# After a worker fails to start (EMFILE, ENOMEM, a broken forkserver), wait this long before
# the next try, doubling up to the cap: such causes pass in seconds, not microseconds.
_START_RETRY_FIRST = 0.1
_START_RETRY_MAX = 5.0


class PoolFuture(UnitFuture):
    """A unit's future in the pool; ``cancel()`` takes the unit back while no worker has
    started it (``take_back``, under the pool's ``lock``)."""

    def __init__(self, unit: WorkUnit, condition: threading.Condition,
                 lock: AbstractContextManager[Any], take_back: Callable[[PoolFuture], bool]
                 ) -> None:
        super().__init__(condition)
        self.unit = unit
        self._pool_lock = lock
        self._take_back = take_back
        self.worker: WorkerHandle | None = None  # the worker it was handed to, if any
        self.ordinal = -1                        # its number on that worker
        self.gone = False                        # taken out of the pending queue

    def cancel(self) -> bool:
        """Cancel it unless a worker has started it (then False, as for a running one)."""
        with self._pool_lock:
            if self._state != PENDING:
                return super().cancel()
            if not self._take_back(self):
                return False  # a worker has started it
            return super().cancel()


class Starts:
    """When the next worker process may start: at once, or, after a failed start, later
    and later (doubling up to a cap) until one succeeds again."""

    def __init__(self) -> None:
        self.error: str | None = None  # why the last start failed, if it did
        self.at = 0.0                  # time.monotonic() before which none is started
        self._delay = _START_RETRY_FIRST

    def failed(self, e: Exception) -> tuple[bool, float]:
        """A start failed: (whether it is the first failure in a row, seconds to wait)."""
        first = self.error is None
        self.error = str(e) or type(e).__name__
        delay = self._delay
        self.at = time.monotonic() + delay
        self._delay = min(delay * 2, _START_RETRY_MAX)
        return first, delay

    def succeeded(self) -> None:
        """A worker started: the next failure waits the shortest time again."""
        self.error = None
        self._delay = _START_RETRY_FIRST


class Remains(NamedTuple):
    """What the units a dead worker held come to (see :meth:`WorkerHandle.remains`)."""

    failed: list[tuple[PoolFuture, BaseException]]  # each ends with that error
    again: list[PoolFuture]                         # each runs on another worker, in order
    culprit: PoolFuture | None                      # the one it was running, if any


class WorkerHandle:
    """One worker process: the process, its pipe, the numbers shared with it under its
    lock, and the futures of the units handed to it that have no outcome yet."""

    __slots__ = ("aborted", "buf", "conn", "ctl", "held", "held_from", "lock", "next",
                 "proc", "queue", "started_at", "started_seen")

    def __init__(self, proc: Any, conn: Connection, ctl: Any, lock: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.ctl = ctl
        self.lock = lock
        self.queue: deque[PoolFuture] = deque()  # handed over, no outcome yet, in order
        self.next = 0                             # the ordinal of the next unit sent
        self.aborted: set[int] = set()            # ordinals killed by abort
        self.buf = bytearray()
        self.held: bytes | None = None            # a batch waiting for the worker to idle
        self.held_from = 0
        self.started_seen = 0                     # the started count last seen
        self.started_at = 0.0                     # when it was first seen

    @property
    def unit(self) -> WorkUnit | None:
        """The unit this worker runs now, if any (the first handed over, once started)."""
        if self.queue and self.queue[0].ordinal < self.ctl[STARTED]:
            return self.queue[0].unit
        return None

    def hand(self, fut: PoolFuture) -> None:
        """Queue ``fut`` on this worker, as the next unit sent (the pool's lock is held)."""
        fut.worker, fut.ordinal = self, self.next
        self.next += 1
        self.queue.append(fut)

    def send_units(self, first: int, units: list[WorkUnit], busy: bool,
                   pool_lock: AbstractContextManager[Any]) -> Exception | None:
        """Send units numbered from ``first`` in one message, or, when the worker is
        ``busy`` and the message too big to wait in its pipe, hold it (under the pool's
        lock) until the worker is idle. The error when a unit cannot be pickled."""
        try:
            data = pickle.dumps((first, units), PROTOCOL)
        except Exception as e:
            return e
        if busy and len(data) > _PIPELINE_BYTES:
            with pool_lock:
                self.held, self.held_from = data, first  # sent once the worker is idle
            return None
        self.send(data)
        return None

    def send(self, data: bytes) -> None:
        """Send one message down the pipe (a dead worker's is dropped)."""
        try:
            self.conn.send_bytes(data)
        except (OSError, ValueError):
            pass  # the worker died: its sentinel says so, and the pool's _bury hands its units on

    def release(self) -> bytes | None:
        """The batch held back for this worker, once it has no unit ahead of that batch
        left (the pool's lock is held); it is no longer held."""
        if self.held is not None and (not self.queue or self.queue[0].ordinal >= self.held_from):
            held, self.held = self.held, None
            return held
        return None

    def receive(self) -> tuple[list[Any], bool]:
        """Read what the worker sent (many messages a read): the messages complete so far,
        and whether its pipe ended."""
        ended = False
        fd = self.conn.fileno()
        try:
            while self.conn.poll():
                chunk = os.read(fd, _READ)
                if not chunk:
                    ended = True
                    break
                self.buf += chunk
                if len(chunk) < _READ:
                    break
        except (OSError, ValueError):
            ended = True
        return read_frames(self.buf), ended

    def see_started(self, now: float) -> int:
        """The count of units the worker has started; notes the time ``now`` when it
        changed, and marks the futures of the units started as running (the pool's lock
        is held)."""
        started: int = self.ctl[STARTED]
        if started != self.started_seen:
            self.started_seen, self.started_at = started, now
        for f in self.queue:
            if f.ordinal >= started:
                break
            if f._state == PENDING:
                f.set_running_or_notify_cancel()
        return started

    def pop(self, ordinal: int) -> PoolFuture | None:
        """The unit ``ordinal`` out of the queue (outcomes come in order: the head)."""
        q = self.queue
        if q and q[0].ordinal == ordinal:
            return q.popleft()
        for f in q:
            if f.ordinal == ordinal:
                q.remove(f)
                return f
        return None

    def revoke(self, ordinal: int) -> list[PoolFuture] | None:
        """Take back unit ``ordinal`` and every unit after it, unless the worker has
        started it (the pool's lock is held): the futures taken off the queue, in order,
        or None when it has started it and nothing changed."""
        if not self.lock.acquire(timeout=0.1):  # a worker killed inside it leaves it held
            return None
        try:
            started, lo, hi = self.ctl[STARTED], self.ctl[LO], self.ctl[HI]
            if started > ordinal:
                return None
            # The range grows over one still ahead of the worker: what it holds stays out.
            self.ctl[LO] = min(lo, ordinal) if hi > started else ordinal
            self.ctl[HI] = self.next
            cut = self.ctl[LO]
        finally:
            self.lock.release()
        back = [f for f in self.queue if f.ordinal >= cut]
        while self.queue and self.queue[-1].ordinal >= cut:
            self.queue.pop()
        return back

    def kill(self) -> None:
        """Kill the process with SIGKILL (one already gone is no error)."""
        try:
            if self.proc.pid is not None:
                os.kill(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass

    def remains(self, code: int | None, stopping: bool) -> Remains:
        """Sort the units of this dead worker (it ended with exit code ``code``; the pool
        is shutting down if ``stopping``) by what becomes of each. Changes nothing."""
        running = self.ctl[STARTED] - 1  # the unit it was on, if it still has no outcome
        failed: list[tuple[PoolFuture, BaseException]] = []
        again: list[PoolFuture] = []
        culprit: PoolFuture | None = None
        for f in self.queue:
            if f.ordinal == running:
                culprit = f
                if f.ordinal in self.aborted:
                    failed.append((f, ExecutorLost(
                        "the worker was stopped (cancel or timeout)")))
                elif stopping:
                    failed.append((f, ExecutorLost("the process pool shut down")))
                elif self.aborted:
                    again.append(f)  # killed to stop another unit: not its fault
                else:
                    failed.append((f, WorkerDied(
                        f"the worker process (pid {self.proc.pid}) running this item died "
                        f"with {describe_exit(code)}")))
            elif stopping:
                failed.append((f, ExecutorLost("the process pool shut down")))
            elif f.ordinal > running:
                again.append(f)  # never started: it runs on another worker
            else:
                failed.append((f, ExecutorLost("its outcome was lost with its worker")))
        return Remains(failed, again, culprit)


def worker_context(preload: list[str]) -> Any:
    """The multiprocessing context workers start from: a ``forkserver`` that has imported
    the worker's module and ``preload`` (``spawn`` where there is none; forking the
    threaded server process itself is unsafe)."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(["bulkrunner.executors.process_worker", *preload])
    return ctx


def spawn(ctx: Any) -> WorkerHandle:
    """Start one worker process from the multiprocessing context ``ctx``."""
    parent, child = ctx.Pipe(duplex=True)
    ctl = ctx.RawArray("q", 3)
    lock = ctx.Lock()
    try:
        proc = ctx.Process(target=worker_main, args=(child, ctl, lock), daemon=True,
                           name="bulkrunner-worker")
        proc.start()
    except BaseException:
        parent.close()  # a failed start must not leak descriptors (EMFILE feeds on them)
        child.close()
        raise
    child.close()
    return WorkerHandle(proc, parent, ctl, lock)


def deliver_reports(msgs: list[Any], reporter: Reporter | None,
                    sink: Callable[[tuple[int, int], int, str], None] | None) -> None:
    """Hand the progress and output messages among a worker's ``msgs`` to the server's
    reporter and log sink, in order; one that fails is logged, never raised."""
    for m in msgs:
        kind = m[0]
        try:
            if kind == "progress" and reporter is not None:
                reporter(m[1], m[2], m[3])
            elif kind == "log" and sink is not None:
                sink(m[1], m[2], m[3])
        except Exception:
            log.exception("%s reporter failed", kind)


def describe_exit(code: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL' for a process exit code."""
    if code is None:
        return "an unknown cause"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (killed: out of memory, or by an operator)" if -code == signal.SIGKILL else ""
        return f"signal {name}{hint}"
    return f"exit code {code}"
