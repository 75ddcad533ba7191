"""The thread executor: items on a ``ThreadPoolExecutor`` in the server's process."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from bulkrunner.runtime import ItemContext, Outcome, Reporter, WorkUnit, run_item


class ThreadExecutor:
    """Items on a ``ThreadPoolExecutor``. For I/O-bound tasks: CPU-bound ones hold the GIL.

    A thread cannot be killed: cancel and timeout set the item's cooperative flag
    (``ctx.cancelled`` / ``ctx.check()``), and the slot stays busy until the function
    returns.
    """

    kind = "thread"

    def __init__(self, max_workers: int, reporter: Reporter | None = None,
                 item_context: ItemContext | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        self._item_context = item_context  # entered around each item (an app context)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="bulkrunner-item")
        self._flags: dict[tuple[tuple[int, int], int], threading.Event] = {}

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Run the attempt on a pool thread; the future gives its Outcome."""
        flag = threading.Event()
        ident = (unit.key, unit.claim)
        self._flags[ident] = flag
        fut = self._pool.submit(run_item, unit, self._reporter, flag, self._item_context)
        fut.add_done_callback(lambda _: self._flags.pop(ident, None))
        return fut

    def abort(self, unit: WorkUnit) -> None:
        """Set the attempt's cooperative flag (a thread cannot be killed)."""
        flag = self._flags.get((unit.key, unit.claim))
        if flag is not None:
            flag.set()

    def health(self) -> tuple[bool, str]:
        """Always ok; the detail is the pool's size."""
        return True, f"{self.max_workers} threads"

    def shutdown(self) -> None:
        """Set every running item's flag and stop the pool without waiting."""
        for flag in list(self._flags.values()):
            flag.set()
        # Threads cannot be killed; do not wait for them (they are daemon-like at exit).
        self._pool.shutdown(wait=False, cancel_futures=True)
