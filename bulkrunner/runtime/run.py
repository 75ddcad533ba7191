"""What runs on a worker: the work unit, the task's context, and :func:`run_item`.

This module is imported by worker processes and Dask workers, so it stays small and imports
nothing from the server side. A task's exception becomes data in the :class:`Outcome`, never
a crash of the worker.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import bulkrunner.runtime.capture as capture
from bulkrunner.runtime.context import Cancelled, Context, Reporter, _current, safe_text

#: Makes the context each item runs in, entered afresh for every attempt (an embedding
#: Flask app's ``app.app_context``: the task sees ``current_app``, a new ``g``, and the
#: app's teardown runs after it). Passed in by the executor; never imported here.
ItemContext = Callable[[], AbstractContextManager[object]]


@dataclass(slots=True)
class WorkUnit:
    """One attempt of one item, as handed to an executor. Picklable and small.

    Not frozen (nor the other records an item's attempt makes): one is built per item
    on the dispatcher's path, and a frozen dataclass's ``__init__`` costs three times a
    plain one's. They are values all the same: nothing changes one once it is built."""

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
    max_error_size: int = 64 * 1024  # bytes of an error's message plus traceback kept

    @property
    def key(self) -> tuple[int, int]:
        """Identifies the item within the server (job sequence number, item index)."""
        return (self.job_seq, self.index)

    def __reduce__(self) -> tuple[type[WorkUnit], tuple[Any, ...]]:
        # Pickled as its fields in a tuple: a tenth of the default's cost (its state dict
        # and copyreg), which counts when a batch of hundreds crosses a pipe.
        return (WorkUnit, (self.job_id, self.job_seq, self.index, self.claim, self.task,
                           self.target, self.params, self.timeout, self.deadline,
                           self.context_param, self.max_result_size, self.max_log_size,
                           self.max_error_size))


@dataclass(slots=True)
class Outcome:
    """How an attempt ended. ``result`` is JSON text; ``error`` is the API's error dict
    (type, message, traceback)."""

    ok: bool
    result: str | None = None
    error: dict[str, Any] | None = None
    worker: str | None = None
    retryable: bool = True

    def __reduce__(self) -> tuple[type[Outcome], tuple[Any, ...]]:
        # As its fields in a tuple (see WorkUnit.__reduce__): one crosses a pipe per item.
        return (Outcome, (self.ok, self.result, self.error, self.worker, self.retryable))


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


_worker_name = ""


def worker_name() -> str:
    """host:pid of the caller, recorded on the item it ran."""
    global _worker_name
    if not _worker_name:  # once per process: a forked child forgets it (below)
        _worker_name = f"{socket.gethostname()}:{os.getpid()}"
    return _worker_name


def _forget_worker_name() -> None:
    global _worker_name
    _worker_name = ""


# Asking for the pid on every item is a system call each time (glibc no longer caches it).
os.register_at_fork(after_in_child=_forget_worker_name)


#: Ends a message or traceback cut to fit ``jobs.max_error_size``.
ERROR_CUT = "… [bulkrunner: cut at jobs.max_error_size ({limit} bytes); {dropped} bytes dropped]"
DEFAULT_MAX_ERROR_SIZE = 64 * 1024
_MAX_TYPE = 200  # characters of an error's type (a class name) kept


def _size(text: str) -> int:
    """Bytes of ``text`` as UTF-8."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _head(text: str, budget: int) -> tuple[str, int]:
    """The head of ``text`` that fits in ``budget`` bytes of UTF-8, and the bytes dropped."""
    if text.isascii():
        return text[:budget], max(0, len(text) - budget)
    data = text.encode("utf-8")
    # "ignore" drops a character cut in half at the end (its bytes count as dropped).
    head = data[:budget].decode("utf-8", "ignore")
    return head, len(data) - _size(head)


def cap_error(error: dict[str, Any], limit: int = DEFAULT_MAX_ERROR_SIZE) -> dict[str, Any]:
    """``error`` with its message and traceback cut to ``limit`` bytes of UTF-8 together.

    Each keeps its head (the traceback's head is its outermost frames); a small one leaves
    its unused room to the other, two large ones get half each. A cut text ends with
    :data:`ERROR_CUT`, which is not counted in ``limit``. The type is cut to 200 characters;
    other keys are kept as they are.
    """
    message = str(error.get("message") or "")
    tb = str(error.get("traceback") or "")
    kind = error.get("type")
    m_size, t_size = _size(message), _size(tb)
    if m_size + t_size <= limit and not (isinstance(kind, str) and len(kind) > _MAX_TYPE):
        return error
    out = dict(error)
    if isinstance(kind, str):  # a class name; only a hostile task makes a long one
        out["type"] = kind[:_MAX_TYPE]
    m_budget = min(m_size, max(limit // 2, limit - t_size))
    for key, text, budget in (("message", message, m_budget),
                              ("traceback", tb, limit - m_budget)):
        head, dropped = _head(text, budget)
        if dropped:
            sep = "\n" if key == "traceback" else " "
            out[key] = f"{head}{sep}{ERROR_CUT.format(limit=limit, dropped=dropped)}"
    return out


def error_dict(exc: BaseException, limit: int = DEFAULT_MAX_ERROR_SIZE) -> dict[str, Any]:
    """The API's error object (type, message, traceback) for an exception, its message and
    traceback cut to ``limit`` bytes together (see :func:`cap_error`)."""
    return cap_error({"type": type(exc).__name__, "message": safe_text(str(exc)),
                      "traceback": safe_text("".join(traceback.format_exception(exc)))},
                     limit)


def run_item(unit: WorkUnit, reporter: Reporter | None = None,
             cancel: threading.Event | None = None,
             around: ItemContext | None = None) -> Outcome:
    """Run one attempt of one item and return its outcome; never raises for task errors.

    With ``around``, the call and the encoding of its result happen inside ``around()``
    (an error entering or leaving it is the attempt's error).

    When the reporter has a ``log`` method (a :data:`~bulkrunner.runtime.capture.LogSink`), what
    the task prints and logs is captured and sent there, all of it before this returns.
    """
    if cancel is not None and cancel.is_set():  # cancelled while it waited for a thread
        return Outcome(ok=False, worker=worker_name(), retryable=False, error={
            "type": "Cancelled", "message": "the item was cancelled before it started",
            "traceback": ""})
    ctx = Context(unit, reporter, cancel if cancel is not None else _NEVER)
    sink: capture.LogSink | None = getattr(reporter, "log", None)
    item_log = capture.begin(unit.key, unit.claim, sink, unit.max_log_size) \
        if sink is not None and unit.max_log_size > 0 else None
    if sink is not None and item_log is None:
        capture.install()  # not captured, but through the routers' limit a second
    prev = getattr(_current, "ctx", None)
    _current.ctx = ctx
    try:
        fn = resolve(unit.target)
        kwargs = dict(unit.params)
        if unit.context_param:
            kwargs[unit.context_param] = ctx
        with around() if around is not None else contextlib.nullcontext():
            value = fn(**kwargs)
            try:
                # None, the most common result, without the encoder's microsecond
                text = "null" if value is None else _ENCODER.encode(value)
            except (TypeError, ValueError) as e:
                return Outcome(ok=False, worker=worker_name(), retryable=False, error=cap_error({
                    "type": "ResultNotSerializable", "message": safe_text(
                        f"the task returned a value that is not JSON: {e}"), "traceback": ""},
                    unit.max_error_size))
        if len(text) > unit.max_result_size:
            return Outcome(ok=False, worker=worker_name(), retryable=False, error={
                "type": "ResultTooLarge",
                "message": f"the result is {len(text)} bytes of JSON, more than "
                           f"jobs.max_result_size ({unit.max_result_size}); return less, "
                           "or write large output to a file and return its path",
                "traceback": ""})
        return Outcome(ok=True, result=text, worker=worker_name())
    except Exception as e:  # the task's own error is data, not a crash
        return Outcome(ok=False, error=error_dict(e, unit.max_error_size), worker=worker_name(),
                       retryable=not isinstance(e, Cancelled))
    finally:
        _current.ctx = prev
        if item_log is not None:
            capture.end(item_log)


#: ``begin(i)``: may unit ``i`` of a batch start now? False when it was taken back.
BatchBegin = Callable[[int], bool]
#: ``done(i, outcome, seconds)``: unit ``i`` of a batch ended after ``seconds`` of run time.
BatchDone = Callable[[int, Outcome, float], None]


#: ``failed(i, exc)``: unit ``i`` raised past :func:`run_item` (``SystemExit`` from the task).
BatchFailed = Callable[[int, BaseException], None]


def run_batch(units: Sequence[WorkUnit], reporter: Reporter | None = None, *,
              flags: Sequence[threading.Event | None] | None = None,
              begin: BatchBegin | None = None, done: BatchDone | None = None,
              failed: BatchFailed | None = None,
              around: ItemContext | None = None) -> list[Outcome | None]:
    """Run the attempts of ``units`` one after another, in order: the entry point of a
    worker handed a batch. Each is :func:`run_item` on its own, with its own context,
    cancel flag (``flags[i]``), progress and captured output.

    ``begin(i)`` is asked just before unit ``i`` starts: a False answer (the unit was
    taken back, to run elsewhere) skips it, and its outcome is None. ``done(i, outcome,
    seconds)`` is told as each ends, so the caller can hand each outcome over at once
    rather than at the end. What :func:`run_item` does not turn into an outcome (a task
    that raises ``SystemExit``) goes to ``failed(i, exc)`` and the batch goes on, or,
    without ``failed``, propagates (a worker process then dies of it, on that unit).
    Returns the outcomes in order.
    """
    out: list[Outcome | None] = []
    clock = time.perf_counter
    for i, unit in enumerate(units):
        if begin is not None and not begin(i):
            out.append(None)
            continue
        t0 = clock()
        try:
            outcome = run_item(unit, reporter, flags[i] if flags is not None else None,
                               around)
        except BaseException as e:
            if failed is None:
                raise
            failed(i, e)
            out.append(None)
            continue
        if done is not None:
            done(i, outcome, clock() - t0)
        out.append(outcome)
    return out


def _json_default(o: Any) -> Any:
    # Common non-JSON values a task may return: sets, tuples come through as lists already.
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


#: Encodes results: one encoder for all (``json.dumps`` with options builds one per call).
_ENCODER = json.JSONEncoder(allow_nan=False, default=_json_default)


class _Never(threading.Event):
    """The cancel flag of an item run without one (a process worker kills instead): never
    set, so one serves every item and none has to build an Event of its own."""

    def set(self) -> None:
        raise RuntimeError("this flag is shared by every item run without one")


_NEVER = _Never()

