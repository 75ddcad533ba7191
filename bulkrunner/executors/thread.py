"""The thread executor: items on a ``ThreadPoolExecutor`` in the server's process."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from bulkrunner.errors import ExecutorLost
from bulkrunner.executors.batching import BatchPolicy, Paces, by_task, split
from bulkrunner.executors.futures import unit_futures
from bulkrunner.runtime import ItemContext, Outcome, Reporter, WorkUnit, run_batch

#: Threads share one interpreter lock, so what is in flight is sized against one core:
#: the run times measured in a thread include the waits for the lock, and a thread's
#: batch of 2 ms holds about 2 ms of the server's time. Batches of 8 ms drained no-op
#: items about 15 % faster, but a one-item submission made during such a drain waited
#: 80 ms at the 99th percentile instead of 32: the server stays responsive first. While
#: items take under 100 ms, one more waits in the pool behind each running one: a thread
#: that ends an item takes the next at once instead of idling for the dispatcher's turn
#: (a millisecond or more under load, 5% of a 25 ms item).
POLICY = BatchPolicy(window=0.002, max_batch=128, short=0.1, cap=1024)

_Ident = tuple[tuple[int, int], int]


class _Flag(threading.Event):
    """An item's cancel flag: set by abort, read by the item's context, never waited on.

    A plain ``Event`` builds a Condition and a lock, which costs more than a short item;
    this is a bare boolean behind the same ``set()`` / ``is_set()``.
    """

    def __init__(self) -> None:  # no Condition: nothing ever waits on this flag
        self._flag = False

    def set(self) -> None:
        self._flag = True

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        raise NotImplementedError("an item's cancel flag is polled, not waited on")


class ThreadExecutor:
    """Items on a ``ThreadPoolExecutor``. For I/O-bound tasks: CPU-bound ones hold the GIL.

    While items are short, a turn's units go to the pool in a few batches (one hand-over
    each) instead of one by one; each unit's future is still its own, and stays
    cancellable until a thread takes the unit up. A thread cannot be killed: cancel and
    timeout set the item's cooperative flag (``ctx.cancelled`` / ``ctx.check()``), and the
    slot stays busy until the function returns.
    """

    kind = "thread"

    def __init__(self, max_workers: int, reporter: Reporter | None = None,
                 item_context: ItemContext | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        self._item_context = item_context  # entered around each item (an app context)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="bulkrunner-item")
        #: The units handed over and not yet ended: their flag and future.
        self._units: dict[_Ident, tuple[_Flag, Future[Outcome]]] = {}
        self.paces = Paces(max_workers, POLICY)

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Run the attempt on a pool thread; the future gives its Outcome."""
        return self.submit_batch([unit])[0]

    def submit_batch(self, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
        """Hand the units to the pool, in batches while items are short."""
        futs: list[Future[Outcome]] = list(unit_futures(len(units)))
        flags = [_Flag() for _ in units]
        for u, flag, f in zip(units, flags, futs, strict=True):
            self._units[(u.key, u.claim)] = (flag, f)
        batches: list[list[int]] = []  # unit positions, each batch of one task
        for group in by_task(range(len(units)), lambda i: units[i].task):
            start = 0
            for n in split(len(group), self.max_workers, self.paces.batch(units[group[0]].task)):
                batches.append(group[start:start + n])
                start += n
        for k, batch in enumerate(batches):
            try:
                self._pool.submit(self._run, [units[i] for i in batch],
                                  [futs[i] for i in batch], [flags[i] for i in batch])
            except RuntimeError:  # shut down meanwhile
                for i in (i for b in batches[k:] for i in b):
                    self._units.pop((units[i].key, units[i].claim), None)
                    if futs[i].set_running_or_notify_cancel():
                        futs[i].set_exception(ExecutorLost("the thread pool is shut down"))
                break
        return futs

    def _run(self, units: Sequence[WorkUnit], futs: Sequence[Future[Outcome]],
             flags: Sequence[_Flag]) -> None:
        """Run one batch (of one task) on this pool thread, settling each unit's future
        as it ends."""
        drop = self._units.pop
        pace = self.paces.get(units[0].task)
        spent = [0.0, 0]  # run time and count not yet told to the pace (told in bunches)

        def begin(i: int) -> bool:
            if futs[i].set_running_or_notify_cancel():
                return True
            u = units[i]
            drop((u.key, u.claim), None)  # cancelled (given back) before it started
            return False

        def done(i: int, out: Outcome, seconds: float) -> None:
            u = units[i]
            drop((u.key, u.claim), None)
            spent[0] += seconds
            spent[1] += 1
            if spent[1] >= 32 or seconds > POLICY.window:
                pace.observe(spent[0], int(spent[1]))
                spent[0], spent[1] = 0.0, 0
            futs[i].set_result(out)

        def failed(i: int, e: BaseException) -> None:
            u = units[i]
            drop((u.key, u.claim), None)
            futs[i].set_exception(e)

        run_batch(units, self._reporter, flags=flags, begin=begin, done=done,
                  failed=failed, around=self._item_context)
        if spent[1]:
            pace.observe(spent[0], int(spent[1]))

    def abort(self, unit: WorkUnit) -> None:
        """Set the attempt's cooperative flag (a thread cannot be killed)."""
        entry = self._units.get((unit.key, unit.claim))
        if entry is not None:
            entry[0].set()

    def health(self) -> tuple[bool, str]:
        """Always ok; the detail is the pool's size."""
        return True, f"{self.max_workers} threads"

    def shutdown(self) -> None:
        """Set every running item's flag and stop the pool without waiting."""
        for flag, fut in list(self._units.values()):
            flag.set()
            fut.cancel()  # not started yet: it never will be
        # Threads cannot be killed; do not wait for them (they are daemon-like at exit).
        self._pool.shutdown(wait=False, cancel_futures=True)
