"""The task's side of an item: :class:`Context`, :func:`context` and :class:`Cancelled`.

Runs on workers, so it imports only the standard library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkrunner.runtime.run import WorkUnit

#: ``report(key, fraction, message)``: how a context sends progress to the server; either
#: may be None for "unchanged".
Reporter = Callable[[tuple[int, int], "float | None", "str | None"], None]


def safe_text(text: str) -> str:
    """``text`` with unpaired surrogates (which ``json.loads`` happily makes, but which have
    no UTF-8 form and which SQLite, msgpack and every HTTP response refuse) written as
    backslash escapes. Text a task reports goes through this before it leaves the item."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class Cancelled(Exception):
    """Raised by :meth:`Context.check` once the item was cancelled."""


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
        self._reporter(self.unit.key, frac,
                       None if message is None else safe_text(str(message)[:1000]))


_current = threading.local()
_NULL_CONTEXT = Context()


def context() -> Context:
    """The context of the item running on this thread (a no-op one outside an item)."""
    return getattr(_current, "ctx", None) or _NULL_CONTEXT
