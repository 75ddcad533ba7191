"""Executors: where items run. Chosen from a table; Dask is imported only when chosen.
:class:`~bulkrunner.executors.inline.InlineExecutor` is the test double (runs in the caller).

Every executor speaks the same small protocol: ``submit(unit) -> Future[Outcome]`` and
``submit_batch(units) -> [Future[Outcome], ...]`` (one future per unit, in order),
``paces`` (each task's batch size, and the share of a worker its items take in flight),
``abort(unit)`` (cancel or
timeout: kill the worker where that is possible, else set the task's cooperative flag),
``health()`` and ``shutdown()``. A task's own exception is data in the Outcome; a future
that raises :class:`WorkerDied` means the worker running that item died (the item spends an
attempt), :class:`ExecutorLost` means the item was merely caught in a failure of the
executor (it is re-queued without spending one). A future the dispatcher cancels
(``Future.cancel()`` returning True) was never started and never will be.

While items are short, executors hand them to workers in batches (see
:mod:`bulkrunner.executors.batching`), each unit still with its own future, progress, log
and failure: a worker that dies in a batch fails only the unit it was running.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, ExecutorLost, WorkerDied
from bulkrunner.executors.batching import Paces
from bulkrunner.executors.thread import ThreadExecutor
from bulkrunner.runtime import ItemContext, Outcome, Reporter, WorkUnit

__all__ = ["FACTORIES", "Executor", "ExecutorLost", "ThreadExecutor", "WorkerDied",
           "make_executor", "submit_each"]


class Executor(Protocol):
    """Where items run: what every executor provides."""

    kind: str
    max_workers: int

    def submit(self, unit: WorkUnit) -> Future[Outcome]:
        """Start an attempt; the future gives its Outcome."""
        ...

    def submit_batch(self, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
        """Start the attempts of one dispatcher turn's claims; one future per unit, in
        order. Each behaves as if it came from :meth:`submit`; the executor decides how
        they travel (in batches while items are short). A future may be cancelled until
        a worker takes its unit up; an executor that cannot take a unit back once handed
        over marks its future running then, so ``cancel()`` answers False."""
        ...

    #: Each task's pace where its items run: how many go in one message
    #: (``paces.batch(task)``), the share of one worker an item takes while in flight
    #: (``paces.cost(task)``: 1 for long items, less for short ones batched and queued
    #: behind each other). The dispatcher claims against them, at most
    #: ``paces.policy.cap`` items in flight.
    paces: Paces

    def abort(self, unit: WorkUnit) -> None:
        """Stop an attempt (cancel or timeout): kill its worker, or set its flag."""
        ...

    def health(self) -> tuple[bool, str]:
        """(ok, detail): whether items can run now, and why not."""
        ...

    def shutdown(self) -> None:
        """Stop running items and release the workers."""
        ...


def submit_each(executor: Executor, units: Sequence[WorkUnit]) -> list[Future[Outcome]]:
    """``submit_batch`` for an executor that hands units over one at a time."""
    return [executor.submit(u) for u in units]


def _process(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    from bulkrunner.executors.process import ProcessExecutor
    return ProcessExecutor(cfg.executor.max_workers, reporter, preload=preload)


def _thread(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    return ThreadExecutor(cfg.executor.max_workers, reporter)


def _dask(cfg: Config, reporter: Reporter | None, preload: list[str]) -> Executor:
    try:
        importlib.import_module("distributed")
    except ImportError:
        raise ConfigError('executor.type = "dask" needs Dask: pip install "bulkrunner[dask]"',
                          file=cfg.source, key="executor.type") from None
    mod = importlib.import_module("bulkrunner.executors.dask")
    return mod.DaskExecutor(cfg, reporter)  # type: ignore[no-any-return]


FACTORIES: dict[str, Callable[[Config, Reporter | None, list[str]], Executor]] = {
    "thread": _thread,
    "process": _process,
    "dask": _dask,
}


def make_executor(cfg: Config, reporter: Reporter | None = None,
                  preload: list[str] | None = None, *,
                  item_context: ItemContext | None = None) -> Executor:
    """Build the executor named by ``cfg.executor.type``.

    ``item_context`` is entered around each item that runs in this process, that is on the
    thread executor; worker processes and Dask workers run items without it.
    """
    if item_context is not None and cfg.executor.type == "thread":
        return ThreadExecutor(cfg.executor.max_workers, reporter, item_context)
    return FACTORIES[cfg.executor.type](cfg, reporter, preload or [])
