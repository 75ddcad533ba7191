"""The inline executor: runs each attempt in the calling thread, at once.

The test double of the executor protocol (as httpx's ``MockTransport`` or huey's immediate
mode): ``submit`` returns a future that is already done, so a dispatcher driven turn by
turn needs no threads and no sleeps. Not for serving: a task that blocks blocks the
dispatcher.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

from bulkrunner.executors.batching import BatchPolicy, Paces
from bulkrunner.runtime import Outcome, Reporter, WorkUnit, run_item

#: Items one at a time, never a second behind the first, whatever they take.
_ALONE = BatchPolicy(window=0.0, max_batch=1, short=0.0)


class InlineExecutor:
    """Items run in the caller's thread; their futures are done when ``submit`` returns."""

    kind = "inline"

    def __init__(self, max_workers: int = 1, reporter: Reporter | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        self.submitted: list[WorkUnit] = []
        self.closed = False
        #: Nothing is batched or claimed ahead: every item takes a whole worker.
        self.paces = Paces(max_workers, _ALONE)

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Run the attempt now; the returned future holds its Outcome."""
        self.submitted.append(unit)
        fut: Future[Outcome] = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(run_item(unit, self._reporter, threading.Event()))
        except BaseException as e:  # run_item makes task errors data; this is ours
            fut.set_exception(e)
        return fut

    def submit_batch(self, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
        """Run the attempts now, one after another; their futures are done."""
        return [self.submit(u) for u in units]

    def abort(self, unit: WorkUnit) -> None:
        """Nothing runs any more by the time this can be called."""

    def health(self) -> tuple[bool, str]:
        """Always ok."""
        return True, "inline"

    def shutdown(self) -> None:
        """Nothing to release."""
        self.closed = True
