"""Tasks for the disk-full and locked-database tests (tests.unwritable_tasks:...)."""

from __future__ import annotations

import os
import time

from bulkrunner import Context


def gate(release: str, done: str, i: int, size: int = 0, ctx: Context | None = None) -> str:
    """Wait until the file ``release`` exists, append ``i`` to the file ``done`` (so a test
    knows the outcome exists on the worker), then return ``i:`` and ``size`` x's."""
    while not os.path.exists(release):
        if ctx is not None:
            ctx.check()
        time.sleep(0.02)
    with open(done, "a") as f:
        f.write(f"{i}\n")
    return f"{i}:" + "x" * size
