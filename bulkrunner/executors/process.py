"""A crash-isolated process pool.

Unlike the stdlib ``ProcessPoolExecutor``, where one dead worker breaks every future in the
pool, each worker here runs one item at a time over its own pipe, so the supervisor always
knows which item a worker holds. A worker that dies (``os._exit``, a signal, out of memory)
fails only its own item, with the exit code or signal in the error; it is replaced and the
others carry on. Timeouts and cancels kill exactly the worker that runs the item.

Workers start from a ``forkserver`` (``spawn`` where that is missing): forking the threaded
server process itself is unsafe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

import bulkrunner.runtime.capture as capture
from bulkrunner.errors import ExecutorLost, WorkerDied
from bulkrunner.runtime import Outcome, Reporter, WorkUnit, run_item

log = logging.getLogger("bulkrunner.executors.process")

# After a worker fails to start (EMFILE, ENOMEM, a broken forkserver), wait this long before
# the next try, doubling up to the cap: such causes pass in seconds, not microseconds.
_SPAWN_RETRY_FIRST = 0.1
_SPAWN_RETRY_MAX = 5.0


def _worker_main(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group; the server decides what stops, not the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report = _PipeReporter(conn)
    # One item at a time here: whatever any thread prints or logs belongs to it.
    capture.install(process_wide=True)
    logging.getLogger().setLevel(logging.INFO)
    lock = report.lock

    while True:
        try:
            unit = conn.recv()
        except (EOFError, OSError):
            return
        if unit is None:
            return
        outcome = run_item(unit, report)
        with lock:
            try:
                conn.send(("done", outcome))
            except (OSError, EOFError):
                return


class _PipeReporter:
    """Sends progress and captured output of the running item up the pipe, in order."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, key: tuple[int, int], frac: float | None, msg: str | None) -> None:
        with self.lock:
            self.conn.send(("progress", key, frac, msg))

    def log(self, key: tuple[int, int], claim: int, text: str) -> None:
        with self.lock:
            self.conn.send(("log", key, claim, text))


class _Worker:
    __slots__ = ("aborted", "conn", "future", "proc", "unit")

    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.unit: WorkUnit | None = None
        self.future: Future[Outcome] | None = None
        self.aborted = False


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


class ProcessExecutor:
    """``max_workers`` worker processes, each running one item at a time."""

    kind = "process"

    def __init__(self, max_workers: int, reporter: Reporter | None = None,
                 preload: list[str] | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        methods = mp.get_all_start_methods()
        self._ctx: Any = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self._ctx.set_forkserver_preload(["bulkrunner.runtime", *(preload or [])])
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pending: deque[tuple[WorkUnit, Future[Outcome]]] = deque()
        self._stopping = False
        self.rebuilds = 0
        self._spawn_error: str | None = None  # why the last worker start failed, if it did
        self._spawn_delay = _SPAWN_RETRY_FIRST
        self._spawn_at = 0.0  # time.monotonic() before which no worker is started
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._supervise, name="bulkrunner-procpool",
                                        daemon=True)
        self._thread.start()
        self._wake()

    # ------------------------------------------------------------------ public
    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Queue the attempt for a worker process; the future gives its Outcome."""
        fut: Future[Outcome] = Future()
        with self._lock:
            if self._stopping:
                fut.set_exception(ExecutorLost("the process pool is shutting down"))
                return fut
            self._pending.append((unit, fut))
        self._wake()
        return fut

    def abort(self, unit: WorkUnit) -> None:
        """Drop the attempt if it has not started, else kill its worker process."""
        with self._lock:
            for i, (u, f) in enumerate(self._pending):
                if u is unit:
                    del self._pending[i]
                    f.set_exception(ExecutorLost("aborted before it started"))
                    return
            for w in self._workers:
                if w.unit is unit:
                    w.aborted = True
                    _kill(w)
                    return

    def health(self) -> tuple[bool, str]:
        """(ok, detail). Not ok while the supervisor is gone, or while no worker is alive
        because the last try to start one failed (so nothing more is claimed for it)."""
        if not self._thread.is_alive():
            return False, "the process pool supervisor stopped"
        with self._lock:
            n = sum(1 for w in self._workers if w.proc.is_alive())
            error = self._spawn_error
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
            pending = list(self._pending)
            self._pending.clear()
            for w in self._workers:
                _kill(w)
        for _, f in pending:
            f.set_exception(ExecutorLost("the process pool shut down"))
        self._wake()
        self._thread.join(timeout=10)
        for w in self._workers:
            w.proc.join(timeout=5)
            if w.future is not None and not w.future.done():
                w.future.set_exception(ExecutorLost("the process pool shut down"))
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ supervisor
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        try:
            proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                     name="bulkrunner-worker")
            proc.start()
        except BaseException:
            parent.close()  # a failed start must not leak descriptors (EMFILE feeds on them)
            child.close()
            raise
        child.close()
        return _Worker(proc, parent)

    def _replenish(self) -> None:
        """Start workers until there are ``max_workers``, unless backing off after a failure.

        Runs on the supervisor thread, the only one that adds or removes workers, so the
        starts (a fork from the forkserver each) happen without holding the pool's lock.
        """
        with self._lock:
            missing = 0 if self._stopping else self.max_workers - len(self._workers)
        if missing <= 0 or time.monotonic() < self._spawn_at:
            return
        for _ in range(missing):
            try:
                w = self._spawn()
            except Exception as e:
                self._spawn_failed(e)
                return
            with self._lock:
                self._workers.append(w)
                self._spawn_error = None
                self._spawn_delay = _SPAWN_RETRY_FIRST
                stopping = self._stopping
            if stopping:
                _kill(w)  # shutdown() killed the others before this one was listed

    def _spawn_failed(self, e: Exception) -> None:
        with self._lock:
            first = self._spawn_error is None
            self._spawn_error = str(e) or type(e).__name__
            delay = self._spawn_delay
            self._spawn_at = time.monotonic() + delay
            self._spawn_delay = min(delay * 2, _SPAWN_RETRY_MAX)
        # The traceback once per outage; then one line per try (at most one per 5 s).
        log.error("cannot start a worker process (%s); trying again in %.1f s",
                  self._spawn_error, delay, exc_info=first)

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
            for w in ended:  # each says, once, that the item it held ended with the pool
                self._bury(w)
            return False
        with self._lock:
            timeout = 1.0
            if not self._stopping:
                if len(self._workers) < self.max_workers:
                    # Wake for the next try to start a worker (backing off after a failure).
                    timeout = min(timeout, max(0.0, self._spawn_at - time.monotonic()))
                for w in self._workers:
                    if w.unit is None and self._pending:
                        unit, fut = self._pending.popleft()
                        if not fut.set_running_or_notify_cancel():
                            continue
                        try:
                            w.conn.send(unit)
                        except (OSError, ValueError) as e:
                            fut.set_exception(ExecutorLost(f"could not send the item: {e}"))
                            continue
                        w.unit, w.future, w.aborted = unit, fut, False
            objs: list[Any] = [self._wake_r]
            by_obj: dict[Any, _Worker] = {}
            for w in self._workers:
                objs += [w.conn, w.proc.sentinel]
                by_obj[w.conn] = w
                by_obj[w.proc.sentinel] = w
        ready = wait(objs, timeout=timeout)
        dead: set[_Worker] = set()
        for obj in ready:
            if obj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            w = by_obj[obj]
            if obj is w.conn:
                self._read(w, dead)
            else:
                dead.add(w)
        for w in dead:
            self._bury(w)
        return True

    def _read(self, w: _Worker, dead: set[_Worker]) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "progress":
                    if self._reporter is not None:
                        try:
                            self._reporter(msg[1], msg[2], msg[3])
                        except Exception:
                            log.exception("progress reporter failed")
                elif msg[0] == "log":
                    sink = getattr(self._reporter, "log", None)
                    if sink is not None:
                        try:
                            sink(msg[1], msg[2], msg[3])
                        except Exception:
                            log.exception("log sink failed")
                elif msg[0] == "done":
                    fut, w.unit, w.future = w.future, None, None
                    if fut is not None and not fut.done():
                        fut.set_result(msg[1])
        except (EOFError, OSError):
            dead.add(w)

    def _bury(self, w: _Worker) -> None:
        w.proc.join(timeout=5)
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            if not self._stopping:
                self.rebuilds += 1
        w.conn.close()
        fut = w.future
        if fut is not None and not fut.done():
            if w.aborted:
                fut.set_exception(ExecutorLost("the worker was stopped (cancel or timeout)"))
            elif self._stopping:
                fut.set_exception(ExecutorLost("the process pool shut down"))
            else:
                fut.set_exception(WorkerDied(
                    f"the worker process (pid {w.proc.pid}) running this item died with "
                    f"{describe_exit(w.proc.exitcode)}"))
        if w.unit is None:
            return
        if self._stopping and not w.aborted:
            # shutdown() killed it: the server is stopping, the worker did not crash.
            log.info("stopping: worker pid %s ended with the server while running item %s "
                     "of job %s (the item goes back to the queue)",
                     w.proc.pid, w.unit.index, w.unit.job_id)
        else:
            log.warning("worker pid %s died with %s while running item %s of job %s",
                        w.proc.pid, describe_exit(w.proc.exitcode), w.unit.index, w.unit.job_id)


def _kill(w: _Worker) -> None:
    try:
        if w.proc.pid is not None:
            os.kill(w.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, OSError):
        pass
