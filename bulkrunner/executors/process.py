"""A crash-isolated process pool, fed in batches while items are short.

Unlike the stdlib ``ProcessPoolExecutor``, where one dead worker breaks every future in the
pool, each worker here has its own pipe and the supervisor always knows which item a
worker runs. A worker that dies (``os._exit``, a signal, out of memory) fails only the
item it was running, with the exit code or signal in the error; it is replaced, and the
items queued behind it go to the other workers without spending an attempt. Timeouts and
cancels kill exactly the worker that runs the item.

While items are short (see :mod:`bulkrunner.executors.batching`) a worker gets a batch of
units in one message, and a second one queued behind it; it sends each outcome back as
the unit ends. Long items go one per message, to an idle worker only. Each worker shares
three numbers with the supervisor (under a lock of theirs): how many units it has started,
and a range of units taken back. The worker counts a unit started before running it, and
skips units in the range, so the supervisor can take back any unit not yet started, to
run it elsewhere (the dispatcher's cancel of an item claimed ahead, an abort, a batch stuck
behind a long item), and knows after a crash which unit was running.

Workers start from a ``forkserver`` (``spawn`` where that is missing): forking the threaded
server process itself is unsafe.

The server's handle of one worker (starting it, its pipe, taking units back from it, what
its units come to once it is dead) is :mod:`bulkrunner.executors.process_handle`; the
worker process itself is :mod:`bulkrunner.executors.process_worker`.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures._base import PENDING

from bulkrunner.errors import ExecutorLost
from bulkrunner.executors.batching import BatchPolicy, Paces, split
from bulkrunner.executors.futures import settle
from bulkrunner.executors.process_handle import (
    PoolFuture,
    Starts,
    WorkerHandle,
    deliver_reports,
    describe_exit,
    spawn,
    worker_context,
)
from bulkrunner.runtime import Outcome, Reporter, WorkUnit

log = logging.getLogger("bulkrunner.executors.process")

#: While items take under 100 ms, a worker holds a second message behind the one it runs,
#: so it starts its next item at once instead of waiting for the supervisor and the
#: dispatcher (a 25 ms item took 28 ms from claim to record without it).
POLICY = BatchPolicy(window=0.004, max_batch=256, short=0.1, cap=4096)
#: A unit that has run this long while others wait behind it on its worker hands them to
#: other workers (at least; or 20 times the average item).
_STUCK = 0.02


class ProcessExecutor:
    """``max_workers`` worker processes, each running one item at a time."""

    kind = "process"

    def __init__(self, max_workers: int, reporter: Reporter | None = None,
                 preload: list[str] | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        self._sink = getattr(reporter, "log", None)
        self._ctx = worker_context(preload or [])
        # Re-entrant: a future cancelled under it runs its callbacks, which may submit.
        self._lock = threading.RLock()
        self._workers: list[WorkerHandle] = []
        self._pending: deque[PoolFuture] = deque()
        self._units: dict[int, PoolFuture] = {}  # id(unit) -> its future, until it ends
        self._stopping = False
        self.rebuilds = 0
        self.paces = Paces(max_workers, POLICY)
        self._starts = Starts()  # when the next worker may start, after a failed start
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Kept across steps (the supervisor's alone): each worker's pipe and sentinel are
        # registered once, not once a step.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._supervise, name="bulkrunner-procpool",
                                        daemon=True)
        self._thread.start()
        self._wake()

    # ------------------------------------------------------------------ public
    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Queue the attempt for a worker process; the future gives its Outcome."""
        return self.submit_batch([unit])[0]

    def submit_batch(self, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
        """Queue the attempts for the worker processes (in batches while items are
        short); one future per unit."""
        cond = threading.Condition()  # one for the hand-over (see executors.futures)
        futs = [PoolFuture(u, cond, self._lock, self._take_back) for u in units]
        with self._lock:
            if self._stopping:
                for f in futs:
                    f.set_exception(ExecutorLost("the process pool is shutting down"))
                return list(futs)
            self._pending.extend(futs)
            for f in futs:
                self._units[id(f.unit)] = f
        self._wake()
        return list(futs)

    def abort(self, unit: WorkUnit) -> None:
        """Drop the attempt if it has not started, else kill its worker process."""
        with self._lock:
            fut = self._units.get(id(unit))
            if fut is None or fut.done():
                return
            w = fut.worker
            if w is None or self._revoke(w, fut.ordinal, fut):
                self._units.pop(id(unit), None)
                if w is None:
                    fut.gone = True
                fut.set_exception(ExecutorLost("aborted before it started"))
                return
            w.aborted.add(fut.ordinal)
            w.kill()

    def health(self) -> tuple[bool, str]:
        """(ok, detail). Not ok while the supervisor is gone, or while no worker is alive
        because the last try to start one failed (so nothing more is claimed for it)."""
        if not self._thread.is_alive():
            return False, "the process pool supervisor stopped"
        with self._lock:
            # The supervisor takes a dead worker off the list within moments (its
            # sentinel); asking each process would cost a system call per turn.
            n = len(self._workers)
            error = self._starts.error
        if error is not None and n == 0:
            return False, f"cannot start worker processes: {error}"
        detail = f"{n} of {self.max_workers} worker processes"
        return True, detail if error is None else f"{detail} (cannot start more: {error})"

    def workers(self) -> int:
        """Worker processes alive now (a dead one is replaced within moments)."""
        with self._lock:
            return sum(1 for w in self._workers if w.proc.is_alive())

    def shutdown(self) -> None:
        """Fail what has not started and stop every worker process."""
        with self._lock:
            self._stopping = True
            pending = [f for f in self._pending if not f.gone]
            self._pending.clear()
            for w in self._workers:
                w.kill()
        for f in pending:
            settle(f, ExecutorLost("the process pool shut down"))
        self._wake()
        self._thread.join(timeout=10)
        for w in self._workers:
            w.proc.join(timeout=5)
            for f in w.queue:
                settle(f, ExecutorLost("the process pool shut down"))
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ taking back
    def _take_back(self, fut: PoolFuture) -> bool:
        """Take a unit that no worker has started out of the pool (the lock is held):
        True when it will not run here."""
        if id(fut.unit) not in self._units:
            return False
        if fut.worker is None:
            fut.gone = True
        elif not self._revoke(fut.worker, fut.ordinal, fut):
            return False
        del self._units[id(fut.unit)]
        return True

    def _revoke(self, w: WorkerHandle, ordinal: int, fut: PoolFuture | None) -> bool:
        """Take back unit ``ordinal`` of worker ``w`` and every unit after it, unless the
        worker has started it (the lock is held). Those after it go back to the front of
        the pending queue, in order; ``fut``, the one asked for, does not."""
        back = w.revoke(ordinal)
        if back is None:
            return False
        self._requeue([f for f in back if f is not fut])
        return True

    def _requeue(self, again: list[PoolFuture]) -> None:
        """Put units taken off a worker back at the front of the pending queue, in order
        (the lock is held), to go to any worker."""
        for f in again:
            f.worker, f.ordinal = None, -1
        self._pending.extendleft(reversed(again))

    # ------------------------------------------------------------------ supervisor
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _spawn(self) -> WorkerHandle:
        return spawn(self._ctx)

    def _replenish(self) -> None:
        """Start workers until there are ``max_workers``, unless backing off after a failure.

        Runs on the supervisor thread, the only one that adds or removes workers, so the
        starts (a fork from the forkserver each) happen without holding the pool's lock.
        """
        with self._lock:
            missing = 0 if self._stopping else self.max_workers - len(self._workers)
        if missing <= 0 or time.monotonic() < self._starts.at:
            return
        for _ in range(missing):
            try:
                w = self._spawn()
            except Exception as e:
                self._spawn_failed(e)
                return
            self._selector.register(w.conn, selectors.EVENT_READ, (w, True))
            self._selector.register(w.proc.sentinel, selectors.EVENT_READ, (w, False))
            with self._lock:
                self._workers.append(w)
                self._starts.succeeded()
                stopping = self._stopping
            if stopping:
                w.kill()  # shutdown() killed the others before this one was listed

    def _spawn_failed(self, e: Exception) -> None:
        with self._lock:
            first, delay = self._starts.failed(e)
        # The traceback once per outage; then one line per try (at most one per 5 s).
        log.error("cannot start a worker process (%s); trying again in %.1f s",
                  self._starts.error, delay, exc_info=first)

    def _supervise(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # background code logs and carries on
                log.exception("process pool supervisor error")
                time.sleep(0.1)  # a fault that repeats must not turn into a busy loop

    def _step(self) -> bool:
        self._replenish()
        with self._lock:
            ended = (list(self._workers) if self._stopping
                     and not any(w.proc.is_alive() for w in self._workers) else None)
        if ended is not None:
            for w in ended:  # each says, once, that the items it held ended with the pool
                self._bury(w)
            return False
        now = time.monotonic()
        with self._lock:
            timeout = 1.0
            if not self._stopping:
                if len(self._workers) < self.max_workers:
                    # Wake for the next try to start a worker (backing off after a failure).
                    timeout = min(timeout, max(0.0, self._starts.at - now))
                if self._watch(now):
                    timeout = min(timeout, _STUCK / 2)
                sends = self._assign()
            else:
                sends = []
        for w, first, units, busy in sends:
            self._send(w, first, units, busy)
        dead: set[WorkerHandle] = set()
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            w, is_pipe = key.data
            if is_pipe:
                self._read(w, dead)
            else:
                dead.add(w)
        for w in dead:
            self._read(w, set())  # what it sent before it died: outcomes of finished units
            self._bury(w)
        return True

    def _watch(self, now: float) -> bool:
        """Mark the futures of units the workers have started as running, and take the
        units queued behind a unit that has run too long to other workers (the lock is
        held). True while a worker holds more than one unit (look again soon)."""
        look = False
        for w in self._workers:
            if not w.queue:
                continue
            started = w.see_started(now)
            if len(w.queue) > 1:
                look = True
                head = w.queue[0]
                pace = self.paces.get(head.unit.task)
                if (head.ordinal < started
                        and now - w.started_at > max(_STUCK, 20 * (pace.average or 0.0))
                        and self._revoke(w, head.ordinal + 1, None)):
                    pace.reset()  # a long item came along: one per message for now
        return look

    def _assign(self) -> list[tuple[WorkerHandle, int, list[WorkUnit], bool]]:
        """Hand pending units to workers that may take more (the lock is held): an idle
        worker, or while items are short one with at most a batch left. Returns the
        messages to send. Each task's units go in batches of its own size."""
        out: list[tuple[WorkerHandle, int, list[WorkUnit], bool]] = []
        while True:
            sends = self._assign_task()
            if not sends:
                return out
            out += sends

    def _assign_task(self) -> list[tuple[WorkerHandle, int, list[WorkUnit], bool]]:
        """What :meth:`_assign` hands out of the first pending unit's task."""
        while self._pending and self._pending[0].gone:
            self._pending.popleft()
        if not self._pending:
            return []
        # The units of the first pending one's task, batched by that task's pace (the
        # next call takes the next task's).
        task = self._pending[0].unit.task
        pace = self.paces.get(task)
        size, depth = pace.batch(), pace.depth()
        run = 0
        for f in self._pending:
            if f.unit.task != task:
                break
            run += 1
        # A dead worker is seen by its sentinel, and _bury hands on what it was given.
        free = [w for w in self._workers if w.held is None
                and (not w.queue or (depth > 1 and len(w.queue) <= size))]
        if not free:
            return []
        free.sort(key=lambda w: len(w.queue))
        sizes = split(run, len(free), size)
        out = []
        for w, n in zip(free, sizes, strict=False):
            units: list[WorkUnit] = []
            first = w.next
            busy = bool(w.queue)
            while len(units) < n and self._pending:
                f = self._pending.popleft()
                if f.gone:
                    continue
                w.hand(f)
                units.append(f.unit)
            if units:
                out.append((w, first, units, busy))
        return out

    def _send(self, w: WorkerHandle, first: int, units: list[WorkUnit], busy: bool) -> None:
        error = w.send_units(first, units, busy, self._lock)
        if error is not None:  # a unit that cannot be pickled: fail those, not the pool
            self._unsendable(w, first, len(units), error)

    def _unsendable(self, w: WorkerHandle, first: int, n: int, e: Exception) -> None:
        with self._lock:
            lost = [f for f in w.queue if first <= f.ordinal < first + n]
            for f in lost:  # the worker never sees these numbers: nothing else changes
                w.queue.remove(f)
                self._units.pop(id(f.unit), None)
        for f in lost:
            settle(f, ExecutorLost(f"could not send the item: {e}"))

    def _read(self, w: WorkerHandle, dead: set[WorkerHandle]) -> None:
        """Read what the worker sent (many messages a read) and act on it."""
        msgs, ended = w.receive()
        if ended:
            dead.add(w)
        if not msgs:
            return
        done: list[tuple[PoolFuture, Outcome]] = []
        spent: dict[str, list[float]] = {}  # run time and count by task, for the paces
        with self._lock:
            for m in msgs:
                if m[0] == "done":
                    f = w.pop(m[1])
                    if f is not None:
                        self._units.pop(id(f.unit), None)
                        if f._state == PENDING:
                            f.set_running_or_notify_cancel()
                        done.append((f, m[2]))
                        s = spent.setdefault(f.unit.task, [0.0, 0])
                        s[0] += m[3]
                        s[1] += 1
            held = w.release()
        if held is not None:
            w.send(held)
        for task, (seconds, n) in spent.items():
            self.paces.observe(task, seconds, int(n))
        # A unit's output came before its outcome, and is handed on before it too, so the
        # turn that records the outcome has all of the output.
        deliver_reports(msgs, self._reporter, self._sink)
        for f, result in done:
            settle(f, result)

    def _bury(self, w: WorkerHandle) -> None:
        for obj in (w.conn, w.proc.sentinel):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(obj)
        w.proc.join(timeout=5)
        code = w.proc.exitcode
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            if not self._stopping:
                self.rebuilds += 1
            failed, again, culprit = w.remains(code, self._stopping)
            w.queue.clear()
            for f, _ in failed:
                self._units.pop(id(f.unit), None)
            self._requeue(again)
        w.conn.close()
        for f, e in failed:
            settle(f, e)
        if again:
            self._wake()
        if culprit is None:
            return
        unit = culprit.unit
        if self._stopping and culprit.ordinal not in w.aborted:
            # shutdown() killed it: the server is stopping, the worker did not crash.
            log.info("stopping: worker pid %s ended with the server while running item %s "
                     "of job %s (the item goes back to the queue)",
                     w.proc.pid, unit.index, unit.job_id)
        else:
            log.warning("worker pid %s died with %s while running item %s of job %s%s",
                        w.proc.pid, describe_exit(code), unit.index, unit.job_id,
                        f" ({len(again)} item(s) queued behind it go to other workers)"
                        if again else "")
