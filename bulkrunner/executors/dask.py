"""Items on a Dask cluster (``executor.type = "dask"``), through ``distributed.Client``.

Imported only when Dask is chosen (see :mod:`bulkrunner.executors`). With
``executor.address`` it connects to a running ``dask scheduler``; with an empty address it
starts a local cluster of ``max_workers`` worker processes, which speaks TLS with a
certificate of this run only. The client, the local cluster and the watch over them are
:class:`~bulkrunner.executors.dask_connection.DaskConnection`; this module is the items.

The queue stays in SQLite: the dispatcher hands this executor the items it has room for.
Long items, and items with a short timeout, become one Dask task each
(:func:`~bulkrunner.executors.dask_worker.run_on_worker`); while items are short, a batch
of them becomes one task (:func:`~bulkrunner.executors.dask_worker.run_batch_on_worker`),
since every Dask task costs several milliseconds of CPU (see
:data:`~bulkrunner.executors.dask_tasks.POLICY`). Each unit still has its own
future, progress, log and cancel flag. The Dask futures are bridged to plain
``concurrent.futures.Future`` objects (marked running once handed to Dask: Dask cannot be
asked to give a task back) so the dispatcher cannot tell executors apart:

- the task's own errors are data in the :class:`Outcome`, as everywhere;
- a worker that died on the item every time Dask re-ran it (``KilledWorker``) is
  :class:`WorkerDied`: the item spends an attempt;
- an item cancelled because the scheduler connection was lost is :class:`ExecutorLost`:
  it is re-queued without spending one. :meth:`DaskExecutor.health` is False until the
  client is connected to a scheduler with workers again, so the dispatcher claims nothing
  meanwhile; the connection's background thread reconnects.
- a batch whose worker died is run again by Dask (at least once); one that killed every
  worker it ran on (``KilledWorker``) is split into one task per unit, without spending an
  attempt, so that only the unit that kills its worker ends :class:`WorkerDied`;
- a unit of a batch that is aborted (cancel, timeout), or a batch that has run far longer
  than its items should take (one of them is stuck), has the units not yet started taken
  back from the worker (:func:`~bulkrunner.executors.dask_worker.take_back`, through
  ``Client.run``) and handed to Dask again, so nobody waits behind a stuck item.

Progress, output and cancel flags travel as Dask events: see
:mod:`bulkrunner.executors.dask_messages`.
"""

# distributed ships partial type hints: many of its calls are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from distributed import Client, KilledWorker

from bulkrunner.config import Config
from bulkrunner.errors import ExecutorLost, WorkerDied
from bulkrunner.executors.batching import Paces
from bulkrunner.executors.dask_connection import DaskConnection
from bulkrunner.executors.dask_messages import (
    CancelEvents,
    dask_failed,
    killed_message,
    report_handler,
    report_topic,
)
from bulkrunner.executors.dask_tasks import (
    POLICY,
    STUCK,
    Batch,
    Ident,
    Inflight,
    plan,
)
from bulkrunner.executors.dask_worker import (
    run_batch_on_worker,
    run_on_worker,
    take_back,
    taken_back,
)
from bulkrunner.executors.futures import settle, unit_futures
from bulkrunner.runtime import Outcome, Reporter, WorkUnit

log = logging.getLogger("bulkrunner.dask")

class DaskExecutor:
    """Runs items as tasks on a Dask cluster.

    For long items ``max_workers`` bounds how many this server has handed to Dask at once,
    not the cluster's size. Set it to the cluster's total threads, or somewhat above: items
    beyond the free threads wait on the scheduler, which hides the scheduler's round trip
    (10-25 ms per item on a loaded 2-CPU machine) at the cost of claiming them early.
    Short items go in batches, ``max_workers`` times two batches at most.
    """

    kind = "dask"

    def __init__(self, cfg: Config, reporter: Reporter | None = None) -> None:
        self.max_workers = cfg.executor.max_workers
        self._topic = report_topic(cfg.store.path)
        self._lock = threading.Lock()
        self._items: dict[Ident, Inflight] = {}
        self._batches: dict[str, Batch] = {}
        #: Units of batches that killed every worker they ran on, run one at a time: a
        #: unit queued on the worker that the culprit kills would be charged too.
        self._probes: deque[Inflight] = deque()
        self._probe: Inflight | None = None
        self.paces = Paces(self.max_workers, POLICY)
        self._batch_keys = (f"bulkrunner-batch-{uuid.uuid4().hex[:12]}-{n}"
                            for n in itertools.count())
        self._cancels = CancelEvents()
        # Abort talks to the scheduler (blocking calls); the dispatcher thread must not wait.
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="bulkrunner-dask-abort")
        self._conn = DaskConnection(cfg, self._lock, self._topic, report_handler(reporter),
                                    self._forget, self._upkeep)
        self._conn.start()

    # ------------------------------------------------------------------ protocol
    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Hand one attempt to Dask; the future settles with its Outcome or an error."""
        return self.submit_batch([unit])[0]

    def submit_batch(self, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
        """Hand the attempts to Dask: one task each for long items (or short timeouts),
        batches of them while items are short. One future per unit."""
        futs: list[Future[Outcome]] = list(unit_futures(len(units)))
        for fut in futs:
            fut.set_running_or_notify_cancel()  # handed to Dask: it cannot be taken back
        with self._lock:
            client = self._conn.client
            why = ("the Dask executor is shutting down" if self._conn.stopping else
                   self._conn.unreachable("not connected")
                   if client is None or client.status != "running" else None)
            if why is not None:
                for f in futs:
                    f.set_exception(ExecutorLost(why))
                return futs
            assert client is not None
            items = [Inflight(u, f, None, client) for u, f in zip(units, futs, strict=True)]
            for it in items:
                self._items[it.ident] = it
        self._dispatch(items, client)
        return futs

    def _dispatch(self, items: list[Inflight], client: Client,
                  single: bool = False) -> None:
        """Submit the items to Dask: in batches while items are short (``single``: one
        task each), each unit with a short timeout on its own (see :func:`plan`)."""
        with self._lock:
            idle = self.max_workers - len(self._batches)
        alone, batches = plan(items, self.paces, idle, single)
        loop: Any = client.loop  # a tornado IOLoop over an asyncio loop, in its own thread
        sent: set[int] = set()
        try:
            for it in alone:
                u = it.unit
                # The unit is one positional argument: Client.submit keeps keyword
                # arguments such as priority or key for itself. pure=False: equal units
                # are not merged.
                it.batch, it.client = None, client
                it.dask_future = client.submit(
                    run_on_worker, u, self._topic, pure=False,
                    key=f"bulkrunner-{u.task}-{u.job_id}-{u.index}-{u.claim}")
                sent.add(id(it))
                # Waits on the client's event loop without blocking it (no thread per
                # item).
                asyncio.run_coroutine_threadsafe(
                    self._collect(it.ident, u.task, client, it.dask_future),
                    loop.asyncio_loop)
            for chunk in batches:
                key = next(self._batch_keys)
                dfut = client.submit(run_batch_on_worker, [it.unit for it in chunk],
                                     self._topic, key, pure=False, key=key)
                batch = Batch(key, chunk, dfut, client)
                for i, it in enumerate(chunk):
                    it.batch, it.index, it.dask_future, it.client = batch, i, dfut, client
                    sent.add(id(it))
                with self._lock:
                    self._batches[key] = batch
                asyncio.run_coroutine_threadsafe(self._collect_batch(batch),
                                                 loop.asyncio_loop)
        except Exception as e:  # the client closed meanwhile: not the items' fault
            lost = ExecutorLost(f"could not hand the item to Dask: {e}")
            for it in items:
                if id(it) not in sent:
                    self._finish(it.ident, lost)

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
            if it.batch is not None:  # the units behind it go elsewhere, unless started
                self._aux.submit(self._take_back, it.batch, it.index)
        except RuntimeError:  # shut down meanwhile
            pass

    def workers(self) -> int:
        """Threads the cluster offers for items, as last seen by the watcher (for
        ``/healthz``)."""
        return self._conn.workers()

    def health(self) -> tuple[bool, str]:
        """(ok, detail). Not ok while the scheduler is unreachable or has no workers."""
        return self._conn.health()

    def shutdown(self) -> None:
        """Fail what is in flight with ExecutorLost, close the client (and local cluster)."""
        with self._lock:
            self._conn.stopping = True
            items = list(self._items.values())
            self._items.clear()
            self._batches.clear()
        self._conn.stop()
        for it in items:
            settle(it.future, ExecutorLost("the Dask executor shut down"))
        self._aux.shutdown(wait=False, cancel_futures=True)
        self._conn.close()

    # ------------------------------------------------------------------ outcomes
    async def _collect(self, ident: Ident, task: str, client: Client, dfut: Any) -> None:
        result: Outcome | BaseException
        try:
            result, seconds = await client.gather(dfut, asynchronous=True)
            self.paces.observe(task, seconds)
        except asyncio.CancelledError:  # the client's loop is closing
            self._finish(ident, ExecutorLost("the Dask client closed"))
            self._probe_ended(ident)
            raise
        except KilledWorker as e:
            result = WorkerDied(killed_message(e))
        except CancelledError as e:
            # Cancelled by us (abort), or with every other pending task when the
            # scheduler connection was lost: either way not the item's fault.
            result = ExecutorLost(f"Dask cancelled the task: {e}")
        except BaseException as e:
            result = dask_failed(e)
        self._finish(ident, result)
        self._probe_ended(ident)

    def _finish(self, ident: Ident, result: Outcome | BaseException) -> None:
        it = self._pop(ident)
        if it is not None:
            settle(it.future, result)

    def _pop(self, ident: Ident) -> Inflight | None:
        # Whoever pops the entry settles the future: exactly once, whichever thread wins.
        with self._lock:
            return self._items.pop(ident, None)

    async def _collect_batch(self, batch: Batch) -> None:
        try:
            got = await batch.client.gather(batch.dask_future, asynchronous=True)
        except asyncio.CancelledError:  # the client's loop is closing
            self._end_batch(batch, ExecutorLost("the Dask client closed"))
            raise
        except KilledWorker:
            # Every worker it ran on died, and nothing says which unit killed them: run
            # each on its own (no attempt spent), so Dask finds the one that does.
            mine = self._end_batch(batch, None)
            if mine:
                log.warning("a batch of %d items killed every Dask worker it ran on; "
                            "running them one per task, one at a time, to find the item "
                            "that does", len(mine))
                with self._lock:
                    for it in mine:
                        it.batch = None
                    self._probes.extend(mine)
                self._next_probe()
            return
        except CancelledError as e:
            self._end_batch(batch, ExecutorLost(f"Dask cancelled the task: {e}"))
            return
        except BaseException as e:
            self._end_batch(batch, dask_failed(e))
            return
        _, outcomes, seconds, ran = got
        if ran:  # a batch holds one task's items
            self.paces.observe(batch.items[0].unit.task, seconds, ran)
        with self._lock:
            self._batches.pop(batch.key, None)
        for it, out in zip(batch.items, outcomes, strict=True):
            if it.batch is batch:  # else taken back and handed out again
                self._finish(it.ident, ExecutorLost(
                    "taken back from its batch") if out is None else out)

    def _next_probe(self) -> None:
        """Hand Dask the next unit to run alone, once the one before has ended."""
        with self._lock:
            if self._probe is not None:
                return
            while self._probes:
                it = self._probes.popleft()
                if self._items.get(it.ident) is it:  # not aborted
                    self._probe = it
                    break
            else:
                return
            client = self._conn.client
        if client is None:
            self._finish(it.ident, ExecutorLost("lost with the Dask client"))
            self._probe_ended(it.ident)
            return
        try:
            self._aux.submit(self._dispatch, [it], client, True)
        except RuntimeError:  # shut down meanwhile
            self._finish(it.ident, ExecutorLost("the Dask executor shut down"))

    def _probe_ended(self, ident: Ident) -> None:
        """The unit ``ident`` ended: when it was the one run alone, hand out the next."""
        with self._lock:
            probe = self._probe
            if probe is None or probe.ident != ident:
                return
            self._probe = None
        self._next_probe()

    def _end_batch(self, batch: Batch, result: Outcome | BaseException | None
                   ) -> list[Inflight]:
        """The batch is over: settle its units still in it with ``result``, or with None
        return them (still in flight) to be handed out again."""
        with self._lock:
            self._batches.pop(batch.key, None)
            mine = [it for it in batch.items if it.batch is batch
                    and self._items.get(it.ident) is it]
        if result is not None:
            for it in mine:
                self._finish(it.ident, result)
            return []
        return mine

    def _take_back(self, batch: Batch, start: int) -> None:
        """Take the units of ``batch`` from ``start`` on that no worker has started yet and
        hand them to Dask again (runs on the aux thread: it waits on the workers)."""
        with self._lock:
            if batch.key not in self._batches or batch.taking_back:
                return
            batch.taking_back = True
        try:
            answers = batch.client.run(take_back, batch.key, start, on_error="return")
        except Exception as e:
            log.info("could not take back the rest of a batch from Dask: %r", e)
            batch.taking_back = False
            return
        cut, ended = taken_back(answers, start, len(batch.items))
        with self._lock:
            batch.taking_back = False
            live = batch.key in self._batches
            moved = [it for it in batch.items[cut:] if live and it.batch is batch
                     and self._items.get(it.ident) is it]
            for it in moved:
                it.batch = None
        for i, out in ended:  # those that ended need not wait for the batch's end
            it = batch.items[i]
            if it.batch is batch:
                self._finish(it.ident, out)
        if moved:
            log.info("took %d item(s) not yet started back from a Dask batch, to run "
                     "elsewhere", len(moved))
            self._dispatch(moved, batch.client)

    def _stuck(self) -> None:
        """Take back what waits behind a batch that runs far longer than it should."""
        now = time.monotonic()
        with self._lock:
            late = [b for b in self._batches.values() if not b.taking_back and now - b.submitted
                    > max(STUCK, 20 * (self.paces.get(b.items[0].unit.task).average or 0.0)
                          * len(b.items))]
        for b in late:
            self.paces.reset(b.items[0].unit.task)
            try:
                self._aux.submit(self._take_back, b, 0)
            except RuntimeError:
                return

    def _abort_remote(self, it: Inflight) -> None:
        try:
            self._cancels.set(it.unit, it.client)
            if it.batch is None:
                it.dask_future.cancel()
        except Exception as e:
            log.info("could not cancel item %s of job %s on Dask: %r",
                     it.unit.index, it.unit.job_id, e)

    # ------------------------------------------------------------------ called by the connection
    def _forget(self, client: Client | None) -> list[Future[Outcome]]:
        """Drop what is in flight on ``client``, which the connection is letting go of
        (called under the lock), and return their futures for it to fail."""
        lost = [self._items.pop(k) for k, i in list(self._items.items()) if i.client is client]
        for key in [k for k, b in self._batches.items() if b.client is client]:
            del self._batches[key]
        return [i.future for i in lost]

    def _upkeep(self) -> None:
        """The watcher's turn, after each look at the connection: clear old cancel
        Events, take back what waits behind stuck batches."""
        self._cancels.clear_old(self._conn.client)
        self._stuck()
