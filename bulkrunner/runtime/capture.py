"""Per-item capture of what a task prints and logs while it runs.

:func:`begin` starts an :class:`ItemLog` for the item on the calling thread and :func:`end`
stops it. Writes to ``sys.stdout`` and ``sys.stderr`` and ``logging`` records go to the
item log of the thread that made them, so two items running at once on the thread
executor never see each other's lines. In a process worker (one item at a time) the whole
process routes to the running item, so threads a task starts are captured too.

Installed once per process: ``sys.stdout`` and ``sys.stderr`` are replaced by a router that
passes writes from threads that run no item to the stream it replaced (at most
:data:`PASS_RATE` characters a second each, so a thread a task started cannot flood the
server's output; what is over is dropped, and a one-line notice says how much), and the
root logger gets one handler. Nothing here starts a thread per item: one flusher thread per
process sends what items wrote every quarter second, so a follower sees lines while the
item runs (and writes the notices of dropped pass-through output). Each attempt keeps the
head of its output up to a size limit, then a marker.

Not captured: writes to file descriptors 1 and 2 below Python (C extensions, child
processes), and bytes written to ``sys.stdout.buffer``.

Imported by :mod:`bulkrunner.runtime`, so it stays in the standard library.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

#: ``sink(key, claim, text)``: where an item's output goes, a chunk at a time. ``key`` is
#: (job sequence number, item index) and ``claim`` tells the item's runs apart.
LogSink = Callable[[tuple[int, int], int, str], None]

TRUNCATED = ("\n[bulkrunner: the log of this attempt reached jobs.max_log_size ({limit} "
             "bytes); later output was dropped]\n")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FLUSH_INTERVAL = 0.25     # seconds between sends of what running items wrote
_FLUSH_SIZE = 16 * 1024    # bytes pending that are sent at once, without waiting
#: Characters a second that writes from threads running no item pass to each real stream.
PASS_RATE = 64 * 1024
DROPPED = ("[bulkrunner: dropped {chars} characters in {writes} writes to {stream} from "
           "threads that run no item, over the limit of {limit} a second]\n")


class ItemLog:
    """What one attempt of one item wrote: the first ``limit`` bytes (UTF-8), then a
    marker. Written to from any thread; sent to the sink in chunks by :meth:`flush`."""

    __slots__ = ("_claim", "_full", "_key", "_limit", "_lock", "_parts", "_pending",
                 "_sink", "_size")

    def __init__(self, key: tuple[int, int], claim: int, sink: LogSink, limit: int) -> None:
        self._key = key
        self._claim = claim
        self._sink = sink
        self._limit = limit
        self._size = 0
        self._pending = 0
        self._parts: list[str] = []
        self._full = False
        # Re-entrant: a sink that warns or logs while sending comes back to write().
        self._lock = threading.RLock()

    def write(self, text: str) -> None:
        """Keep ``text`` unless the attempt's limit was reached."""
        if self._full or not text:
            return
        data: bytes | None = None
        n = len(text)
        if not text.isascii():
            # Unpaired surrogates have no UTF-8 form and SQLite could not store them.
            data = text.encode("utf-8", "backslashreplace")
            n = len(data)
        with self._lock:
            if self._full:
                return
            room = self._limit - self._size
            if n > room:
                data = data if data is not None else text.encode()
                text = data[:room].decode("utf-8", "ignore") + TRUNCATED.format(
                    limit=self._limit)
                self._full = True
                n = room
            elif data is not None:
                text = data.decode("utf-8")
            self._parts.append(text)
            self._size += n
            self._pending += n
            if self._pending >= _FLUSH_SIZE or self._full:
                self._flush_locked()

    def flush(self) -> None:
        """Send what was written since the last flush."""
        if self._parts:
            with self._lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        # Sending under the lock keeps chunks in order when the flusher thread and the
        # item's own thread flush at the same moment.
        if not self._parts:
            return
        text = "".join(self._parts)
        self._parts.clear()
        self._pending = 0
        try:
            self._sink(self._key, self._claim, text)
        except Exception:  # a broken pipe or a closed server must not fail the task
            pass


# --------------------------------------------------------------------------- routing
_local = threading.local()
_process_log: ItemLog | None = None
_process_wide = False
_active: set[ItemLog] = set()
_lock = threading.Lock()
_flusher: threading.Thread | None = None
_log = logging.getLogger("bulkrunner.capture")


def current() -> ItemLog | None:
    """The item log that output of the calling thread belongs to, or None."""
    log: ItemLog | None = getattr(_local, "log", None)
    return log if log is not None else _process_log


def outside_items(record: logging.LogRecord) -> bool:
    """A logging filter: True for records that no item captures (for the server's own
    handlers, so a task's log lines go to its item and not also to the server log)."""
    return current() is None


class _Router:
    """Stands in for ``sys.stdout`` or ``sys.stderr``: writes from a thread that runs an
    item go to its log, all others to the stream this replaced, at most ``limit``
    characters a second (the rest of that second's writes are dropped and counted; a
    notice of them comes before the next write that passes, or from the flusher)."""

    def __init__(self, target: TextIO, limit: int = PASS_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target = target
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._window = clock()  # the start of the current second
        self._used = 0          # characters passed in it
        self._dropped = 0       # characters dropped since the last notice
        self._drops = 0         # writes dropped since the last notice

    @property
    def target(self) -> TextIO:
        return self._target

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        log = current()
        if log is None:
            return self._pass(text)
        log.write(text)
        return len(text)

    def _pass(self, text: str) -> int:
        """Write ``text`` to the real stream if this second's budget has room for it."""
        n = len(text)
        with self._lock:
            notice = self._next_window()
            if self._used + n > self._limit:
                # The rest of the second is dropped too, so that no newline of print()
                # slips through after the text it ended was dropped.
                self._used = self._limit + 1
                self._dropped += n
                self._drops += 1
                text = ""
            else:
                self._used += n
        if notice:
            self._target.write(notice)
        if text:
            self._target.write(text)
        return n

    def _next_window(self) -> str:
        """Called under the lock: start a new second if this one is over, and return the
        notice of what the last one dropped ("" when nothing)."""
        now = self._clock()
        if now - self._window < 1.0:
            return ""
        self._window = now
        self._used = 0
        if not self._drops:
            return ""
        name = getattr(self._target, "name", None)
        notice = DROPPED.format(chars=self._dropped, writes=self._drops, limit=self._limit,
                                stream=name if isinstance(name, str) else "the stream")
        self._dropped = self._drops = 0
        return notice

    def report_drops(self) -> None:
        """Write the notice of a finished second's drops, when no write since has."""
        if not self._drops:
            return
        with self._lock:
            notice = self._next_window()
        if notice:
            try:
                self._target.write(notice)
                self._target.flush()
            except (OSError, ValueError):  # a closed or broken stream
                pass

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if current() is None:
            self._target.flush()

    def isatty(self) -> bool:
        return False if current() is not None else self._target.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _Handler(logging.Handler):
    """Writes records made on an item's thread to its log, formatted as plain lines."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        # No handler lock: ItemLog.write is thread-safe, and one lock shared by every item
        # thread would serialise their logging.
        log = current()
        if log is None:
            # Outside items this handler is nothing; where it is the only one, records
            # would vanish instead of reaching logging's last resort (stderr).
            if record.levelno >= logging.WARNING and logging.lastResort is not None and \
                    logging.getLogger().handlers == [self]:
                logging.lastResort.handle(record)
            return False
        try:
            log.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        self.handle(record)


_HANDLER = _Handler()


def real_stream(stream: Any) -> Any:
    """The stream behind a router (for the server's own log handler), else ``stream``."""
    while isinstance(stream, _Router):
        stream = stream.target
    return stream


def install(*, process_wide: bool | None = None) -> None:
    """Put the routers in ``sys.stdout``/``sys.stderr`` and the handler on the root logger.

    Idempotent and cheap when already in place; :func:`begin` calls it each time because
    something else (a test runner, ``logging.basicConfig(force=True)``) may have replaced
    the streams or the handlers since. ``process_wide=True`` (process workers) routes
    output of every thread to the running item. Starts the flusher thread (once).
    """
    global _process_wide, _flusher
    if process_wide is not None:
        _process_wide = process_wide
    if _flusher is None:  # (a forked child forgets its parent's: see _forget_flusher)
        with _lock:
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_loop, name="bulkrunner-logflush",
                                            daemon=True)
                _flusher.start()
    root = logging.getLogger()
    if (type(sys.stdout) is _Router and type(sys.stderr) is _Router
            and _HANDLER in root.handlers):
        return
    with _lock:
        if sys.stdout is not None and type(sys.stdout) is not _Router:
            sys.stdout = _Router(sys.stdout)  # type: ignore[assignment]
        if sys.stderr is not None and type(sys.stderr) is not _Router:
            sys.stderr = _Router(sys.stderr)  # type: ignore[assignment]
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)


def begin(key: tuple[int, int], claim: int, sink: LogSink, limit: int) -> ItemLog:
    """Capture the calling thread's output (the process's, when process-wide) for an item."""
    global _process_log
    install()
    log = ItemLog(key, claim, sink, limit)
    _local.log = log
    if _process_wide:
        _process_log = log
    with _lock:
        _active.add(log)
    return log


def end(log: ItemLog) -> None:
    """Stop capturing for ``log`` and send what is left (before the outcome is sent)."""
    global _process_log
    _local.log = None
    if _process_log is log:
        _process_log = None
    with _lock:
        _active.discard(log)
    log.flush()


def _flush_loop() -> None:
    while True:
        time.sleep(_FLUSH_INTERVAL)
        with _lock:
            logs = list(_active)
        for log in logs:
            try:
                log.flush()
            except Exception:  # started once (see install): nothing may end this thread
                _log.exception("sending the output of item %s failed", log._key)
        for stream in (sys.stdout, sys.stderr):
            if type(stream) is _Router:
                stream.report_drops()


def _forget_flusher() -> None:
    global _flusher
    _flusher = None


# The flusher thread is not copied into a forked child; install() starts the child's own.
# (Asking the thread whether it is alive instead costs a lock on every item.)
os.register_at_fork(after_in_child=_forget_flusher)
