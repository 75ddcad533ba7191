"""Short turns at the interpreter while a big submission is read and checked.

Checking a 100,000-item bulk is about half a second of Python in its request thread. A
thread busy in Python keeps the interpreter for the switch interval (5 ms by default) each
time another thread asks for it, and a one-item request asks a few dozen times (after each
socket read, commit or lock it waited on), so next to a bulk it took 170 ms at p99. With
0.5 ms turns it took 22 ms. Turns that short for good would cost the item threads: the
thread executor drained 10-25 % fewer no-op items. So turns are short only while some big
submission is being handled, and only under ``bulkrunner serve`` (:func:`enable`): in an
app that embeds bulkrunner the interval is the app's to set.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds a thread runs Python before another may, while a big submission is handled.
SHORT = 0.0005

_lock = threading.Lock()
_enabled = False
_holders = 0
_normal = 0.005


def enable() -> None:
    """Let :func:`short_turns` change the interval (``bulkrunner serve`` owns the process)."""
    global _enabled
    _enabled = True


@contextmanager
def short_turns() -> Iterator[None]:
    """Make the switch interval :data:`SHORT` until every thread inside this is out of it
    (the interval it had then comes back); nothing unless :func:`enable` was called."""
    global _holders, _normal
    if not _enabled:
        yield
        return
    with _lock:
        if _holders == 0:
            _normal = sys.getswitchinterval()
            sys.setswitchinterval(SHORT)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                sys.setswitchinterval(_normal)
