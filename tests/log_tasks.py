"""Tasks that print and log, for the capture tests (registered as tests.log_tasks:...)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("tests.log_tasks")


def chatter(name: str, lines: int = 5, delay: float = 0.02,
            barrier: str | None = None) -> str:
    """Print, write to stderr and log `lines` lines each, tagged with `name`."""
    for i in range(lines):
        print(f"{name} out {i}")
        sys.stderr.write(f"{name} err {i}\n")
        log.info("%s log %d", name, i)
        time.sleep(delay)
    return name


def ticker(n: int = 10, delay: float = 0.2) -> int:
    """Print one line every `delay` seconds."""
    for i in range(n):
        print(f"tick {i}", flush=True)
        time.sleep(delay)
    return n


def flood(size: int = 200_000, line: int = 100) -> int:
    """Print about `size` bytes in lines of `line` bytes."""
    text = "x" * (line - 1)
    for _ in range(size // line):
        print(text)
    return size


def thread_print(name: str) -> str:
    """Print from a thread the task starts (captured on the process executor)."""
    t = threading.Thread(target=lambda: print(f"{name} from a thread"))
    t.start()
    t.join()
    return name


def print_then_fail(name: str) -> None:
    """Print a line, then raise."""
    print(f"{name} before the failure")
    raise RuntimeError(f"{name} failed")


def odd_text() -> str:
    """Print non-ASCII text and a lone surrogate (which has no UTF-8 form)."""
    print("naïve ✓")
    print("half \ud800 pair")
    return "ok"


def print_until(path: str, name: str = "gate", timeout: float = 60.0) -> str:
    """Print a line, wait for the file `path` to exist (up to `timeout` s), print another."""
    print(f"{name} before", flush=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    print(f"{name} after", flush=True)
    return name
