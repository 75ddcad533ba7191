"""What runs on a worker: the work unit, the task's context, and :func:`run_item`.

This module is imported by worker processes and Dask workers, so it stays small and imports
nothing from the server side. A task's exception becomes data in the :class:`Outcome`, never
a crash of the worker.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bulkrunner.capture as capture

#: ``report(key, fraction, message)``: how a context sends progress to the server; either
#: may be None for "unchanged".
Reporter = Callable[[tuple[int, int], "float | None", "str | None"], None]


class Cancelled(Exception):
    """Raised by :meth:`Context.check` once the item was cancelled."""


@dataclass(frozen=True)
class WorkUnit:
    """One attempt of one item, as handed to an executor. Picklable and small."""

    job_id: str
    job_seq: int
    index: int
    claim: int
    task: str
    target: str                    # "module:function", from the server's registry only
    params: dict[str, Any]
    timeout: float                 # seconds, 0 = none
    deadline: float | None         # wall-clock time.time() when the attempt is over
    context_param: str | None = None
    max_result_size: int = 1 << 20
    max_log_size: int = 64 * 1024  # bytes of printed and logged output kept; 0 = none

    @property
    def key(self) -> tuple[int, int]:
        """Identifies the item within the server (job sequence number, item index)."""
        return (self.job_seq, self.index)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended. ``result`` is JSON text; ``error`` is the contract's error dict."""

    ok: bool
    result: str | None = None
    error: dict[str, Any] | None = None
    worker: str | None = None
    retryable: bool = True


class Context:
    """Handed to a task that asks for it (a parameter annotated ``Context``), or found
    with :func:`bulkrunner.context` while an item runs.

    It reports progress and a message, and tells the task when it should stop: when its
    item was cancelled or its deadline passed. Thread tasks cannot be killed, so a long
    task should call :meth:`check` now and then.
    """

    def __init__(self, unit: WorkUnit | None = None, reporter: Reporter | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.unit = unit
        self._reporter = reporter
        self._cancel = cancel or threading.Event()
        self._last_report = 0.0

    @property
    def job_id(self) -> str | None:
        """The id of the item's job, or None outside an item."""
        return self.unit.job_id if self.unit else None

    @property
    def index(self) -> int | None:
        """The item's index in its job, or None outside an item."""
        return self.unit.index if self.unit else None

    @property
    def deadline(self) -> float | None:
        """Wall-clock time (``time.time()``) at which this attempt times out, or None."""
        return self.unit.deadline if self.unit else None

    @property
    def cancelled(self) -> bool:
        """True once the item was cancelled or timed out: the task should stop."""
        return self._cancel.is_set() or (self.deadline is not None and time.time() >= self.deadline)

    def check(self) -> None:
        """Raise :class:`Cancelled` or :class:`TimeoutError` if the task should stop."""
        if self._cancel.is_set():
            raise Cancelled("the item was cancelled")
        if self.deadline is not None and time.time() >= self.deadline:
            raise TimeoutError(f"the attempt passed its timeout of {self.unit.timeout:g} s"
                               if self.unit else "timed out")

    def progress(self, done: float, total: float | None = None,
                 message: str | None = None) -> None:
        """Report ``done`` out of ``total`` (or a fraction when total is None) and a message."""
        frac = (done / total if total else done) if total != 0 else 1.0
        frac = min(max(float(frac), 0.0), 1.0)
        self._send(frac, message)

    def message(self, text: str) -> None:
        """Report a message without changing the progress."""
        self._send(None, text)

    def _send(self, frac: float | None, message: str | None) -> None:
        if self._reporter is None or self.unit is None:
            return
        self._reporter(self.unit.key, frac, None if message is None else str(message)[:1000])


_current = threading.local()
_NULL_CONTEXT = Context()


def context() -> Context:
    """The context of the item running on this thread (a no-op one outside an item)."""
    return getattr(_current, "ctx", None) or _NULL_CONTEXT


@functools.lru_cache(maxsize=256)
def resolve(target: str) -> Callable[..., Any]:
    """Import ``module:function``. Only ever called with paths from the server's config."""
    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


_worker_name: tuple[int, str] = (0, "")


def worker_name() -> str:
    """host:pid of the caller, recorded on the item it ran."""
    global _worker_name
    pid = os.getpid()
    if _worker_name[0] != pid:  # once per process (a forked worker has a new pid)
        _worker_name = (pid, f"{socket.gethostname()}:{pid}")
    return _worker_name[1]


def error_dict(exc: BaseException) -> dict[str, Any]:
    """The contract's error object for an exception."""
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}


def run_item(unit: WorkUnit, reporter: Reporter | None = None,
             cancel: threading.Event | None = None) -> Outcome:
    """Run one attempt of one item and return its outcome; never raises for task errors.

    When the reporter has a ``log`` method (a :data:`~bulkrunner.capture.LogSink`), what
    the task prints and logs is captured and sent there, all of it before this returns.
    """
    if cancel is not None and cancel.is_set():  # cancelled while it waited for a thread
        return Outcome(ok=False, worker=worker_name(), retryable=False, error={
            "type": "Cancelled", "message": "the item was cancelled before it started",
            "traceback": ""})
    ctx = Context(unit, reporter, cancel)
    sink: capture.LogSink | None = getattr(reporter, "log", None)
    item_log = capture.begin(unit.key, unit.claim, sink, unit.max_log_size) \
        if sink is not None and unit.max_log_size > 0 else None
    prev = getattr(_current, "ctx", None)
    _current.ctx = ctx
    try:
        fn = resolve(unit.target)
        kwargs = dict(unit.params)
        if unit.context_param:
            kwargs[unit.context_param] = ctx
        value = fn(**kwargs)
        try:
            text = json.dumps(value, allow_nan=False, default=_json_default)
        except (TypeError, ValueError) as e:
            return Outcome(ok=False, worker=worker_name(), retryable=False, error={
                "type": "ResultNotSerializable",
                "message": f"the task returned a value that is not JSON: {e}", "traceback": ""})
        if len(text) > unit.max_result_size:
            return Outcome(ok=False, worker=worker_name(), retryable=False, error={
                "type": "ResultTooLarge",
                "message": f"the result is {len(text)} bytes of JSON, more than "
                           f"jobs.max_result_size ({unit.max_result_size}); return less, "
                           "or write large output to a file and return its path",
                "traceback": ""})
        return Outcome(ok=True, result=text, worker=worker_name())
    except Exception as e:  # the task's own error is data, not a crash
        return Outcome(ok=False, error=error_dict(e), worker=worker_name(),
                       retryable=not isinstance(e, Cancelled))
    finally:
        _current.ctx = prev
        if item_log is not None:
            capture.end(item_log)


def _json_default(o: Any) -> Any:
    # Common non-JSON values a task may return: sets, tuples come through as lists already.
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
