"""Tasks the benchmarks register in their server config (as ``bench.tasks:...``)."""

from __future__ import annotations

import time


def noop_i(i: int = 0) -> None:
    """Do nothing with one item's ``i`` (for drain throughput)."""


def nap(seconds: float = 0.025, i: int = 0) -> None:
    """Sleep ``seconds`` with a plain ``time.sleep``, no progress reports (for makespan)."""
    time.sleep(seconds)
