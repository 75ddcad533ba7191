"""Tasks that push the size limits, for tests/test_limits.py (tests.limit_tasks:...)."""

from __future__ import annotations

import threading

#: How the message of :func:`huge_error` starts, so a test can find its head.
HEAD = "the head of a huge message: "


def huge_error(size: int = 10_000_000, char: str = "x") -> None:
    """Raise a RuntimeError whose message is about ``size`` characters of ``char``."""
    raise RuntimeError(HEAD + char * size)


def thread_flood(size: int = 2_000_000, line: int = 100) -> int:
    """Print about ``size`` characters, in lines of ``line``, from a thread the task
    starts (on the thread executor that thread runs no item: its output is not captured)."""
    text = "y" * (line - 1)

    def flood() -> None:
        for _ in range(size // line):
            print(text)

    t = threading.Thread(target=flood)
    t.start()
    t.join()
    return size
