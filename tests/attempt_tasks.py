"""A task for the attempts tests (tests/test_attempts_shown.py), registered as
``tests.attempt_tasks:gate``: it fails a set number of calls, then holds its item running
until the test lets it go."""

from __future__ import annotations

import os
import time

from bulkrunner import Context


def gate(path: str, fail_times: int = 0, ctx: Context | None = None) -> int:
    """Count this call in the file `path`; fail the first `fail_times` calls; then wait
    until the file `path`.go exists (at most 60 s, or until cancelled) and return the
    call's number."""
    n = 1
    if os.path.exists(path):
        with open(path) as f:
            n = int(f.read() or 0) + 1
    with open(path, "w") as f:
        f.write(str(n))
    if n <= fail_times:
        raise RuntimeError(f"failure {n}")
    deadline = time.monotonic() + 60
    while not os.path.exists(path + ".go") and time.monotonic() < deadline:
        if ctx is not None and ctx.cancelled:
            break
        time.sleep(0.02)
    return n
