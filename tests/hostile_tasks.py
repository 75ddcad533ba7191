"""Tasks that report hostile text, for tests/test_hostile.py (imported by worker processes
too, so it stays small)."""

from __future__ import annotations

import time

from bulkrunner import Context

SURROGATE = "\ud800"


def surrogate_progress(steps: int = 20, delay: float = 0.05,
                       ctx: Context | None = None) -> str:
    """Report a progress message with a lone surrogate for a while, then succeed."""
    assert ctx is not None
    for i in range(steps):
        ctx.progress(i, steps, f"processing {SURROGATE} {i}")
        time.sleep(delay)
    return "done"


def surrogate_result() -> dict[str, str]:
    """Return text with a lone surrogate and a non-ASCII letter."""
    return {"s": f"a{SURROGATE}b", "t": "é"}


def surrogate_error() -> None:
    """Fail with a lone surrogate in the message."""
    raise ValueError(f"bad {SURROGATE} input")


def quick() -> int:
    """Succeed at once."""
    return 1
