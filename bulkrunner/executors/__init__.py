"""Executors: where items run. Chosen from a table; Dask is imported only when chosen.
:class:`~bulkrunner.executors.inline.InlineExecutor` is the test double (runs in the caller).

Every executor speaks the same small protocol: ``submit(unit) -> Future[Outcome]``,
``abort(unit)`` (cancel or timeout: kill the worker where that is possible, else set the
task's cooperative flag), ``health()`` and ``shutdown()``. A task's own exception is data in
the Outcome; a future that raises :class:`WorkerDied` means the worker running that item
died (the item spends an attempt), :class:`ExecutorLost` means the item was merely caught
in a failure of the executor (it is re-queued without spending one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, ExecutorLost, WorkerDied
from bulkrunner.executors.thread import ThreadExecutor
from bulkrunner.runtime import ItemContext, Outcome, Reporter, WorkUnit

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
