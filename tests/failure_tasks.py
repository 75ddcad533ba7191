"""Tasks that fail in known ways, for tests/test_failures.py."""

from __future__ import annotations

LONG = "x" * 600


def judge(n: int) -> int:
    """Fail with one of four errors by ``n`` (see tests/test_failures.py); else return n."""
    if n % 3 == 0:
        raise ValueError("bad input")
    if n % 5 == 0:
        raise RuntimeError(f"too round\nfor {n % 2}")
    if n in (7, 22):
        raise TypeError("wrong kind")
    if n in (28, 29):  # messages that differ only past the 500 characters of a group key
        raise OSError(LONG + str(n))
    return n


def distinct(n: int) -> None:
    """Fail with a message of its own for every ``n``."""
    raise ValueError(f"message {n:02d}")
