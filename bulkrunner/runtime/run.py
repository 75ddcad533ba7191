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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bulkrunner.runtime.capture as capture
from bulkrunner.runtime.context import Cancelled, Context, Reporter, _current, safe_text


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
    return {"type": type(exc).__name__, "message": safe_text(str(exc)),
            "traceback": safe_text("".join(traceback.format_exception(exc)))}


def run_item(unit: WorkUnit, reporter: Reporter | None = None,
             cancel: threading.Event | None = None) -> Outcome:
    """Run one attempt of one item and return its outcome; never raises for task errors.

    When the reporter has a ``log`` method (a :data:`~bulkrunner.runtime.capture.LogSink`), what
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
