"""Giving freed memory back to the system after a big submission.

A 100,000-item submission builds some 30 MB of short-lived objects (the parsed body, each
item's params and their JSON). Python frees them when the request ends, but glibc's malloc
keeps the freed pages in its heaps, and by default in one heap per thread that used it (up
to eight per core), so without this the server's RSS would climb to the peak of the biggest
request times the request threads. :func:`limit_arenas` (called once by ``bulkrunner
serve``, before its threads start) keeps two heaps, and :func:`trim_soon` asks glibc to hand
the free pages back (``malloc_trim``) on a background thread, a moment after a big request
is over. Where the C library has neither (musl, macOS) they do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("bulkrunner.memory")

#: Seconds after the call: the request's objects are gone by then (its answer is sent).
DELAY = 0.5


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2


def limit_arenas(n: int = ARENAS) -> None:
    """Let threads share ``n`` malloc heaps (for the threads started from now on)."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, n)
    except (OSError, AttributeError):
        pass


_lock = threading.Lock()
_timer: threading.Timer | None = None


def _trim() -> None:
    global _timer
    with _lock:
        _timer = None
    try:
        if _TRIM is not None:
            _TRIM(0)  # ctypes gives up the GIL meanwhile
    except Exception:  # background code logs and carries on
        log.exception("malloc_trim failed")


def trim_soon() -> None:
    """Hand freed memory back to the system shortly (once, however often it is asked
    meanwhile)."""
    global _timer
    if _TRIM is None:
        return
    with _lock:
        if _timer is not None:
            return
        _timer = threading.Timer(DELAY, _trim)
        _timer.daemon = True
        _timer.start()


__all__ = ["ARENAS", "limit_arenas", "trim_soon"]
