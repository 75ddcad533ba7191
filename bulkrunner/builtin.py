"""Demo tasks that work with no config at all."""

from __future__ import annotations

import time
from typing import Any

from bulkrunner.runtime import Context


def echo(**params: Any) -> dict[str, Any]:
    """Return the params it was given."""
    return params


def sleep(seconds: float = 1.0, ctx: Context | None = None) -> dict[str, float]:
    """Sleep for `seconds`, reporting progress ten times a second; stops early when cancelled."""
    started = time.monotonic()
    end = started + seconds
    while True:
        now = time.monotonic()
        if ctx is not None:
            ctx.check()
            ctx.progress(now - started, seconds or 1, f"slept {now - started:.1f} of {seconds:g} s")
        if now >= end:
            break
        time.sleep(min(0.1, end - now))
    return {"slept": round(time.monotonic() - started, 3)}


def fail(message: str = "this task always fails") -> None:
    """Raise a RuntimeError with `message` (to see how failures look)."""
    raise RuntimeError(message)
