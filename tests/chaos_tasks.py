"""Tasks of the chaos test: each run appends one line to a runs file before it works, so
the test can count how often every item ran."""

from __future__ import annotations

import os
import time


def work(runs: str, tag: str, i: int, delay: float = 0.02, fail: bool = False) -> int:
    """Record this run of item ``i`` of job ``tag``, sleep ``delay``, then return ``i``
    (or raise, for an item meant to fail)."""
    fd = os.open(runs, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag}:{i}\n".encode())  # one write: lines never interleave
    finally:
        os.close(fd)
    time.sleep(delay)
    if fail:
        raise ValueError(f"item {i} of {tag} fails on purpose")
    return i
