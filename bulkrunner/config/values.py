"""Typed values in the config: checks by type, durations, rates, host names."""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
from typing import Any

from bulkrunner.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def typed(value: Any, want: type, key: str, source: str) -> Any:
    """``value`` when it has the type ``want`` (an int is a float too; a tuple is a list
    of strings), else a ConfigError naming ``key``."""
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'must be a list of names in quotes, like ["a.example"], not '
                              f"{value!r}", file=source, key=key)
        return tuple(v.strip().lower() for v in value if v.strip())
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
        names = {str: "a string in quotes", int: "a whole number", float: "a number",
                 bool: "true or false", dict: "a table like { key = \"value\" }"}
        raise ConfigError(f"must be {names.get(want, want.__name__)}, not {value!r}",
                          file=source, key=key)
    return value


def parse_duration(value: Any, key: str = "duration", source: str | None = None) -> Any:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a number.

    Anything else is returned as is, for the type check to name.
    """
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ConfigError(f'must be a number of seconds or an age like "7d", "12h", "30m" '
                          f"or \"45s\", not {value!r}", file=source, key=key) from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigError(f"must be a finite age, not {value!r}", file=source, key=key)
    return seconds


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.I)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any, key: str, source: str) -> tuple[int, float] | None:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` as (N, window seconds); ``""`` is None (no limit)."""
    if value == "":
        return None
    m = _RATE.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(f'must be a rate like "20/s", "100/m" or "5000/h" (at least 1 '
                          f'start per window), or "" for none; not {value!r}',
                          file=source, key=key)
    return int(m.group(1)), _PER[m.group(2).lower()]


@functools.lru_cache(maxsize=256)
def host_is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def suggest(word: str, options: list[str]) -> str:
    """"; did you mean 'x'?" for the closest option, and the list of known keys."""
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"{hint} Known keys: {', '.join(options)}."
