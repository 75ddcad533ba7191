"""Items on a Dask cluster (``executor.type = "dask"``), through ``distributed.Client``.

Imported only when Dask is chosen (see :mod:`bulkrunner.executors`). With
``executor.address`` it connects to a running ``dask scheduler``; with an empty address it
starts a :class:`distributed.LocalCluster` of ``max_workers`` worker processes (one thread
each, on loopback), so Dask can be tried on one machine.

A Dask scheduler, its workers and nannies run whatever a connected client sends, and
loopback is open to every user of the machine, so the local cluster speaks TLS with a key
and certificate made for this run (:meth:`distributed.security.Security.temporary`, kept in
memory and handed to the worker processes when they start): it listens on ``tls://``
addresses and requires every peer, this server's own client included, to present that
certificate. An external scheduler is secured by Dask's own configuration
(``distributed.comm.tls.*``, which ``Client`` reads): see docs/dask.md.

The queue stays in SQLite: the dispatcher hands this executor at most ``max_workers`` items
at a time, and each becomes one Dask task running :func:`run_on_worker`. The Dask future
is bridged to a plain ``concurrent.futures.Future`` so the dispatcher cannot tell executors
apart:

- the task's own errors are data in the :class:`Outcome`, as everywhere;
- a worker that died on the item every time Dask re-ran it (``KilledWorker``) is
  :class:`WorkerDied`: the item spends an attempt;
- an item cancelled because the scheduler connection was lost is :class:`ExecutorLost`:
  it is re-queued without spending one. :meth:`DaskExecutor.health` is False until the
  client is connected to a scheduler with workers again, so the dispatcher claims nothing
  meanwhile; a background thread reconnects.

Progress reports and captured output travel worker -> scheduler -> server as Dask events
on a topic private to this server; cooperative cancel is a ``distributed.Event`` per
attempt that the item's :class:`~bulkrunner.runtime.Context` polls while the task checks it.
"""

# distributed ships partial type hints: many of its calls are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from distributed import Client, Event, KilledWorker, LocalCluster, get_worker
from distributed.security import Security

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, ExecutorLost, WorkerDied
from bulkrunner.runtime import Outcome, Reporter, WorkUnit, error_dict, run_item

log = logging.getLogger("bulkrunner.dask")

CONNECT_TIMEOUT = 10.0   # seconds for one attempt to reach the scheduler
CLOSE_TIMEOUT = 10.0     # seconds for closing the client or the local cluster
_WATCH_INTERVAL = 1.0    # seconds between looks at the connection and the worker count
_PROGRESS_INTERVAL = 0.2  # a worker sends an item's progress at most this often
_FLAG_POLL = 0.1         # a task's cancel check asks the scheduler at most this often
_EVENT_TTL = 600.0       # seconds before a cancel Event that was set is cleared again

_Ident = tuple[tuple[int, int], int]


def cancel_event_name(unit: WorkUnit) -> str:
    """Name of the ``distributed.Event`` that cancels this attempt of this item."""
    return f"bulkrunner-cancel-{unit.job_id}-{unit.index}-{unit.claim}"


# ---------------------------------------------------------------------- on the worker
class _RemoteFlag(threading.Event):
    """The item's cancel flag as seen on a Dask worker.

    :class:`Context` only calls ``is_set()``; here that asks the scheduler for the
    attempt's ``distributed.Event``, at most every ``_FLAG_POLL`` seconds (a check costs a
    round trip, about 0.4 ms on loopback), and nothing at all for tasks that never check.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._event: Event | None = None
        self._next = 0.0

    def is_set(self) -> bool:
        if super().is_set():
            return True
        now = time.monotonic()
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
    :mod:`bulkrunner.runtime.capture`), each sent before the task's result, so an item's log is
    complete when its outcome is recorded.
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


def run_on_worker(unit: WorkUnit, topic: str) -> Outcome:
    """Run one attempt on a Dask worker; the outcome names the worker's address.

    Module-level so it pickles by reference: ``bulkrunner`` and the task's module must be
    importable on every worker.
    """
    worker = get_worker()
    out = run_item(unit, _WorkerReports(worker, topic), _RemoteFlag(cancel_event_name(unit)))
    return dataclasses.replace(out, worker=worker.address)


# ---------------------------------------------------------------------- on the server
@dataclasses.dataclass(eq=False)
class _Inflight:
    unit: WorkUnit
    future: Future[Outcome]
    dask_future: Any
    client: Client


class DaskExecutor:
    """Runs items as tasks on a Dask cluster; at most ``max_workers`` in flight.

    ``max_workers`` bounds how many items this server has handed to Dask at once, not the
    cluster's size. Set it to the cluster's total threads, or somewhat above: items beyond
    the free threads wait on the scheduler, which hides the scheduler's round trip (10-25 ms
    per item on a loaded 2-CPU machine) at the cost of claiming them early.
    """

    kind = "dask"

    def __init__(self, cfg: Config, reporter: Reporter | None = None) -> None:
        self.max_workers = cfg.executor.max_workers
        self.address = cfg.executor.address
        self._reporter = reporter
        # Private to this server, so that servers sharing a scheduler never see each
        # other's reports (item keys are only unique within one database); the same
        # after a restart, because the scheduler keeps up to 1,000 events per topic.
        ident = f"{socket.gethostname()}:{os.path.abspath(cfg.store.path)}"
        self._topic = f"bulkrunner-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        self._lock = threading.Lock()
        self._items: dict[_Ident, _Inflight] = {}
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        # The local cluster's TLS credentials; None for an external scheduler, where
        # Client takes them from Dask's config (distributed.comm.tls.*), if any.
        self._security: Security | None = None
        self._up = False               # client connected and subscribed, as last seen
        self._state = (False, "connecting to the Dask scheduler")
        self._threads = 0              # the cluster's threads, as last seen by the watcher
        self._logged = ""              # the last unhealthy detail logged, to log changes only
        self._stopping = False
        self._stop = threading.Event()
        self._set_events: deque[tuple[float, str]] = deque()
        # Abort talks to the scheduler (blocking calls); the dispatcher thread must not wait.
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="bulkrunner-dask-abort")
        if not self.address:
            # A local cluster failing to start is a setup error: let `serve` report it.
            # Processes, so CPU-bound items do not share the server's GIL (and
            # processes=False with host= fails to start). The dashboard on a
            # free loopback port: dashboard_address=None still binds the fixed :8787,
            # which a second server would collide with. TLS with this run's own
            # certificate (see the module docstring): with security= LocalCluster picks
            # tls:// for the scheduler, the nannies and the workers by itself.
            self._security = _temporary_security(cfg)
            self._cluster = LocalCluster(
                n_workers=self.max_workers, threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address="127.0.0.1:0",
                security=self._security)
            self.address = self._cluster.scheduler_address
            log.info("started a local Dask cluster of %d worker processes at %s, TLS with "
                     "a certificate of this run only (dashboard %s)", self.max_workers,
                     self.address, self._cluster.dashboard_link)
        # A remote scheduler that is down at start is not fatal: the server comes up,
        # /healthz says why, and the watcher keeps trying.
        self._connect()
        self._refresh()
        self._watcher = threading.Thread(target=self._watch, name="bulkrunner-dask-watch",
                                         daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ protocol
    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Hand one attempt to Dask; the future settles with its Outcome or an error."""
        fut: Future[Outcome] = Future()
        with self._lock:
            client = self._client
            if self._stopping:
                fut.set_exception(ExecutorLost("the Dask executor is shutting down"))
                return fut
            if client is None or client.status != "running":
                fut.set_exception(ExecutorLost(self._unreachable("not connected")))
                return fut
            # The unit is one positional argument: Client.submit keeps keyword arguments
            # such as priority or key for itself. pure=False: equal units are not merged.
            dfut = client.submit(run_on_worker, unit, self._topic, pure=False,
                                 key=f"bulkrunner-{unit.task}-{unit.job_id}-{unit.index}"
                                     f"-{unit.claim}")
            ident = (unit.key, unit.claim)
            self._items[ident] = _Inflight(unit, fut, dfut, client)
        # Waits on the client's event loop without blocking it (no thread per item).
        loop: Any = client.loop  # a tornado IOLoop over an asyncio loop, in its own thread
        asyncio.run_coroutine_threadsafe(self._collect(ident, client, dfut), loop.asyncio_loop)
        return fut

    def abort(self, unit: WorkUnit) -> None:
        """Cancel the attempt: free its slot now, set its cancel Event, cancel the task.

        A task already running on a worker thread cannot be interrupted; it stops at its
        next ``ctx.check()``, or runs to the end and its result is dropped.
        """
        it = self._pop((unit.key, unit.claim))
        if it is None:
            return
        it.future.set_exception(ExecutorLost("the attempt was stopped (cancel or timeout)"))
        try:
            self._aux.submit(self._abort_remote, it)
        except RuntimeError:  # shut down meanwhile
            pass

    def workers(self) -> int:
        """Threads the cluster offers for items, as last seen by the watcher (for
        ``/healthz``)."""
        return self._threads if self._state[0] else 0

    def health(self) -> tuple[bool, str]:
        """(ok, detail). Not ok while the scheduler is unreachable or has no workers."""
        client = self._client
        if client is not None and client.status != "running":
            return False, self._unreachable(f"connection lost, client {client.status}")
        return self._state

    def shutdown(self) -> None:
        """Fail what is in flight with ExecutorLost, close the client (and local cluster)."""
        with self._lock:
            self._stopping = True
            items = list(self._items.values())
            self._items.clear()
        self._stop.set()
        for it in items:
            _settle(it.future, ExecutorLost("the Dask executor shut down"))
        self._aux.shutdown(wait=False, cancel_futures=True)
        self._watcher.join(timeout=CONNECT_TIMEOUT + CLOSE_TIMEOUT)
        self._close_client()
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=CLOSE_TIMEOUT)
            except Exception as e:
                log.warning("closing the local Dask cluster failed: %r", e)

    # ------------------------------------------------------------------ outcomes
    async def _collect(self, ident: _Ident, client: Client, dfut: Any) -> None:
        result: Outcome | BaseException
        try:
            result = await client.gather(dfut, asynchronous=True)
        except asyncio.CancelledError:  # the client's loop is closing
            self._finish(ident, ExecutorLost("the Dask client closed"))
            raise
        except KilledWorker as e:
            result = WorkerDied(_killed_message(e))
        except CancelledError as e:
            # Cancelled by us (abort), or with every other pending task when the
            # scheduler connection was lost: either way not the item's fault.
            result = ExecutorLost(f"Dask cancelled the task: {e}")
        except BaseException as e:
            # run_item turns the task's own errors (an unimportable task module included)
            # into an Outcome, so this is Dask failing around it: the result cannot be
            # unpickled here, a task that raised a BaseException, an error of Dask's own.
            # Charge an attempt with the reason in the item's error rather than
            # re-queueing it for ever.
            err = error_dict(e)
            err["message"] = f"Dask could not run the item: {err['message']}"
            result = Outcome(ok=False, error=err)
        self._finish(ident, result)

    def _finish(self, ident: _Ident, result: Outcome | BaseException) -> None:
        it = self._pop(ident)
        if it is not None:
            _settle(it.future, result)

    def _pop(self, ident: _Ident) -> _Inflight | None:
        # Whoever pops the entry settles the future: exactly once, whichever thread wins.
        with self._lock:
            return self._items.pop(ident, None)

    def _abort_remote(self, it: _Inflight) -> None:
        try:
            Event(cancel_event_name(it.unit), client=it.client).set()
            self._set_events.append((time.monotonic(), cancel_event_name(it.unit)))
            it.dask_future.cancel()
        except Exception as e:
            log.info("could not cancel item %s of job %s on Dask: %r",
                     it.unit.index, it.unit.job_id, e)

    def _on_event(self, event: tuple[float, Any]) -> None:
        # Runs on the client's event loop: the reporter only updates dicts under a lock.
        if self._reporter is None:
            return
        try:
            kind, seq, index, *rest = event[1]
            if kind == "progress":
                self._reporter((int(seq), int(index)), rest[0], rest[1])
            elif kind == "log":
                sink = getattr(self._reporter, "log", None)
                if sink is not None:
                    sink((int(seq), int(index)), int(rest[0]), str(rest[1]))
        except Exception:
            log.exception("bad event from a Dask worker: %.200r", event)

    # ------------------------------------------------------------------ connection
    def _connect(self) -> bool:
        try:
            target: Any = self._cluster if self._cluster is not None else self.address
            client = Client(target, timeout=CONNECT_TIMEOUT, set_as_default=False,
                            security=self._security)
        except Exception as e:
            self._state = (False, self._unreachable(str(e) or type(e).__name__))
            return False
        with self._lock:
            if not self._stopping:
                self._client = client
        if self._stopping:  # shut down while we were connecting
            client.close(timeout=CLOSE_TIMEOUT)
            return False
        log.info("connected to the Dask scheduler at %s", self.address)
        return True

    def _close_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            lost = [i for i in self._items.values() if i.client is client]
            for i in lost:
                self._items.pop((i.unit.key, i.unit.claim), None)
        for i in lost:
            _settle(i.future, ExecutorLost("lost with the Dask client"))
        if client is not None:
            try:
                client.close(timeout=CLOSE_TIMEOUT)
            except Exception as e:
                log.debug("closing the Dask client: %r", e)

    def _unreachable(self, why: str) -> str:
        return f"scheduler unreachable at {self.address}: {why}; reconnecting"

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_INTERVAL):
            try:
                client = self._client
                if client is None or client.status in ("closing", "closed", "failed"):
                    # The client gave up reconnecting by itself (after CONNECT_TIMEOUT):
                    # start a new one. A failed attempt already took CONNECT_TIMEOUT
                    # retrying, so no further back-off is needed.
                    self._close_client()
                    if not self._connect():
                        continue
                self._refresh()
                self._clear_old_events()
            except Exception:  # background code logs and carries on
                log.exception("Dask watcher error")

    def _refresh(self) -> None:
        """Look at the connection and the worker count; log changes of health."""
        client = self._client
        was_ok = self._state[0]
        if client is None:
            ok, detail = self._state
        elif client.status != "running":
            self._up = False
            ok, detail = False, self._unreachable(f"connection lost, client {client.status}")
        else:
            if not self._up:
                # Events are pushed only to subscribers; a reconnected client is new to
                # the scheduler, so subscribe (again).
                client.subscribe_topic(self._topic, self._on_event)
                self._up = True
            try:
                try:
                    info = client.scheduler_info(n_workers=0)  # totals only: cheap
                except TypeError:  # distributed < 2025.4 always sends every worker
                    info = client.scheduler_info()
                workers = info.get("workers") or {}
                n = int(info.get("n_workers", len(workers)))
                threads = int(info.get("total_threads",
                                       sum(w.get("nthreads", 0) for w in workers.values())))
                ok = n > 0
                self._threads = threads if ok else 0
                detail = (f"{n} Dask workers ({threads} threads) at {self.address}" if ok
                          else f"the Dask scheduler at {self.address} has no workers")
            except Exception as e:
                ok, detail = False, self._unreachable(str(e) or type(e).__name__)
        self._state = (ok, detail)
        if ok != was_ok or (not ok and detail != self._logged):
            self._logged = detail
            (log.info if ok else log.warning)("Dask executor %s: %s",
                                              "available" if ok else "unavailable", detail)

    def _clear_old_events(self) -> None:
        client = self._client
        while self._set_events and time.monotonic() - self._set_events[0][0] > _EVENT_TTL:
            _, name = self._set_events.popleft()
            if client is not None and client.status == "running":
                try:
                    Event(name, client=client).clear()
                except Exception as e:
                    log.debug("clearing %s: %r", name, e)


def _temporary_security(cfg: Config) -> Security:
    """A key and self-signed certificate for one run of the local cluster (in memory)."""
    try:
        security: Security = Security.temporary()
    except ImportError:  # it needs the cryptography package
        raise ConfigError('the local Dask cluster (executor.address = "") needs the '
                          '"cryptography" package for its TLS certificates: '
                          "pip install cryptography",
                          file=cfg.source, key="executor.address") from None
    return security


def _settle(fut: Future[Outcome], result: Outcome | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _killed_message(e: KilledWorker) -> str:
    last = getattr(e, "last_worker", None)
    where = getattr(last, "address", last)
    tries = getattr(e, "allowed_failures", None)
    return (f"the Dask worker running this item died (last on {where}), and so did every "
            f"worker Dask re-ran it on ({tries} re-runs allowed: "
            "distributed.scheduler.allowed-failures); out of memory, a crash in native "
            "code, or the task killed its worker")
