"""Execution policy: how long a failed item waits before its retry, and how often an item
may be cut short by a stopping server before it is failed.

The store applies these as data it is given; it decides nothing of its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: An item found running at start-up this many times fails instead of running again, in
#: case it is what stops the server.
INTERRUPTIONS_ALLOWED = 3


def backoff_delay(base: float, cap: float) -> Callable[[int], float]:
    """Exponential backoff with equal jitter: after attempt n, wait in [d/2, d] where
    d = min(cap, base * 2**(n-1))."""
    def delay(attempt: int) -> float:
        d = min(cap, base * (2.0 ** max(attempt - 1, 0)))
        return float(d / 2 + random.random() * d / 2)
    return delay


__all__ = ["INTERRUPTIONS_ALLOWED", "backoff_delay"]
