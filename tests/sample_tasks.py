"""Tasks used by the tests (registered through a test config as tests.sample_tasks:...)."""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
from typing import Literal

from bulkrunner import Context


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b


def typed(n: int, ratio: float, flag: bool, name: str = "x",
          mode: Literal["fast", "slow"] = "fast", color: Color = Color.RED,
          tags: list[str] | None = None) -> dict[str, object]:
    """Echo typed params back."""
    return {"n": n, "ratio": ratio, "flag": flag, "name": name, "mode": mode,
            "color": color if isinstance(color, str) else color.value, "tags": tags}


def square(x: int) -> int:
    """Square x; fail on negative x."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def noop() -> None:
    """Do nothing (for throughput)."""


def slow(seconds: float = 10.0, ctx: Context | None = None) -> str:
    """Sleep in small steps, checking for cancel and timeout."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ctx is not None:
            ctx.check()
        time.sleep(0.02)
    return "done"


def stubborn(seconds: float = 10.0) -> str:
    """Sleep without checking anything (cannot be stopped cooperatively)."""
    time.sleep(seconds)
    return "done"


def die(code: int = 7) -> None:
    """Kill the worker process running this item."""
    sys.stdout.flush()
    os._exit(code)


def sigkill_self() -> None:
    """Kill the worker with SIGKILL (as the OOM killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


def flaky(path: str, fail_times: int = 1) -> int:
    """Fail the first `fail_times` calls (counted in a file), then succeed."""
    n = 0
    if os.path.exists(path):
        with open(path) as f:
            n = int(f.read() or 0)
    with open(path, "w") as f:
        f.write(str(n + 1))
    if n < fail_times:
        raise RuntimeError(f"flaky failure {n + 1}")
    return n + 1


def progress(steps: int = 5, delay: float = 0.2, ctx: Context | None = None) -> int:
    """Report progress step by step."""
    for i in range(steps):
        if ctx is not None:
            ctx.progress(i + 1, steps, f"step {i + 1} of {steps}")
        time.sleep(delay)
    return steps


def record(path: str, i: int, delay: float = 0.0) -> int:
    """Append i to a file (one line per run) so tests can count runs; optional delay."""
    if delay:
        time.sleep(delay)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def big(n: int = 2_000_000) -> str:
    """Return a large string."""
    return "x" * n


def tally(n: int, loud: bool = False, delay: float = 0.25,
          ctx: Context | None = None) -> dict[str, object]:
    """Count to n, one step every `delay` seconds, reporting progress; return the sum."""
    for i in range(n):
        if ctx is not None:
            ctx.check()
            ctx.progress(i, n, f"counted {i} of {n}")
        time.sleep(delay)
    return {"n": n, "loud": loud, "sum": n * (n + 1) // 2}
