"""Executors: where items run. Chosen from a table; Dask is imported only when chosen.

Every executor speaks the same small protocol: ``submit(unit) -> Future[Outcome]``,
``abort(unit)`` (cancel or timeout: kill the worker where that is possible, else set the
task's cooperative flag), ``health()`` and ``shutdown()``. A task's own exception is data in
the Outcome; a future that raises :class:`WorkerDied` means the worker running that item
died (the item spends an attempt), :class:`ExecutorLost` means the item was merely caught
in a failure of the executor (it is re-queued without spending one).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, ExecutorLost, WorkerDied
from bulkrunner.worker import Outcome, Reporter, WorkUnit, run_item

__all__ = ["FACTORIES", "Executor", "ExecutorLost", "ThreadExecutor", "WorkerDied",
           "make_executor"]


class Executor(Protocol):
    """Where items run: what every executor provides."""

    kind: str
    max_workers: int

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Start an attempt; the future gives its Outcome."""
        ...

    def abort(self, unit: WorkUnit) -> None:
        """Stop an attempt (cancel or timeout): kill its worker, or set its flag."""
        ...

    def health(self) -> tuple[bool, str]:
        """(ok, detail): whether items can run now, and why not."""
        ...

    def shutdown(self) -> None:
        """Stop running items and release the workers."""
        ...


class ThreadExecutor:
    """Items on a ``ThreadPoolExecutor``. For I/O-bound tasks: CPU-bound ones hold the GIL.

    A thread cannot be killed: cancel and timeout set the item's cooperative flag
    (``ctx.cancelled`` / ``ctx.check()``), and the slot stays busy until the function
    returns.
    """

    kind = "thread"

    def __init__(self, max_workers: int, reporter: Reporter | None = None) -> None:
        self.max_workers = max_workers
        self._reporter = reporter
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="bulkrunner-item")
        self._flags: dict[tuple[tuple[int, int], int], threading.Event] = {}

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Run the attempt on a pool thread; the future gives its Outcome."""
        flag = threading.Event()
        ident = (unit.key, unit.claim)
        self._flags[ident] = flag
        fut = self._pool.submit(run_item, unit, self._reporter, flag)
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


def _process(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    from bulkrunner.procpool import ProcessExecutor
    return ProcessExecutor(cfg.executor.max_workers, reporter, preload=preload)


def _thread(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    return ThreadExecutor(cfg.executor.max_workers, reporter)


def _dask(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    try:
        importlib.import_module("distributed")
    except ImportError:
        raise ConfigError('executor.type = "dask" needs Dask: pip install "bulkrunner[dask]"',
                          file=cfg.source, key="executor.type") from None
    mod = importlib.import_module("bulkrunner.dask_executor")
    return mod.DaskExecutor(cfg, reporter)  # type: ignore[no-any-return]


FACTORIES: dict[str, Callable[[Config, Reporter | None, list[str]], Executor]] = {
    "thread": _thread,
    "process": _process,
    "dask": _dask,
}


def make_executor(cfg: Config, reporter: Reporter | None = None,
                  preload: list[str] | None = None) -> Executor:
    """Build the executor named by ``cfg.executor.type``."""
    return FACTORIES[cfg.executor.type](cfg, reporter, preload or [])
