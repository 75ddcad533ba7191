"""The schedules page's words: a cron expression or an interval in English, and fire times
in the zone the schedule is read in."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

log = logging.getLogger("bulkrunner.web")

_UNITS = (("week", 7 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60),
          ("second", 1))


@functools.lru_cache(maxsize=256)
def cron_words(expr: str) -> str:
    """A five-field cron expression in English ("At 03:00, Monday through Friday"), by
    cron-descriptor; "" when it cannot say (the page then shows the expression alone)."""
    try:
        from cron_descriptor import ExpressionDescriptor, Options

        options = Options()
        options.use_24hour_time_format = True
        return str(ExpressionDescriptor(expr, options).get_description())
    except Exception as e:  # words are a help, never a reason for the page to fail
        log.debug("no words for the cron expression %r: %s", expr, e)
        return ""


def every_words(seconds: int) -> str:
    """``600`` as "Every 10 minutes" (the largest unit that divides it)."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"Every {unit}" if n == 1 else f"Every {n} {unit}s"
    return f"Every {seconds} seconds"


def in_zone(iso: str | None, zone: str) -> str:
    """An API time shown in ``zone``: ``2026-12-02 03:00:00 CET``; "—" for none."""
    if not iso:
        return "—"
    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return when.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def rows(schedules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API's schedules with what the page shows besides: ``words`` (when it fires, in
    English) and ``next_local`` / ``last_local`` (the times in the schedule's zone)."""
    out = []
    for s in schedules:
        words = cron_words(s["cron"]) if s["cron"] else every_words(int(s["every"] or 0))
        out.append({**s, "words": words, "next_local": in_zone(s["next_run"], s["timezone"]),
                    "last_local": in_zone(s["last_run"], s["timezone"])})
    return out
