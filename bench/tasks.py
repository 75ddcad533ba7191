"""Tasks the benchmarks register in their server config (as ``bench.tasks:...``)."""

from __future__ import annotations


def noop_i(i: int = 0) -> None:
    """Do nothing with one item's ``i`` (for drain throughput)."""
