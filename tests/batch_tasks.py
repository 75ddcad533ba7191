"""Tasks for the batching tests (registered as tests.batch_tasks:...): short items that
record each run in a file, one of which dies or hangs."""

from __future__ import annotations

import os
import signal
import time


def _record(path: str, i: int) -> None:
    if path:
        with open(path, "a") as f:  # one short append: whole lines even from many processes
            f.write(f"{i}\n")


def maybe_die(i: int, die_at: int = -1, path: str = "") -> int:
    """Record the run; item ``die_at`` kills its worker process with SIGKILL."""
    _record(path, i)
    if i == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def maybe_hang(i: int, hang_at: int = -1, seconds: float = 60.0, path: str = "") -> int:
    """Record the run; item ``hang_at`` sleeps ``seconds`` without checking for cancel."""
    _record(path, i)
    if i == hang_at:
        time.sleep(seconds)
    return i
