"""The ``schedules`` command: the server's schedules with their next and latest runs."""

from __future__ import annotations

import json
from datetime import datetime, tzinfo
from typing import Any

import click

from bulkrunner.client import display
from bulkrunner.client.options import Ctx, global_options, pass_ctx

_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def every_text(seconds: int) -> str:
    """``600`` as ``10m``, ``90`` as ``90s``: the largest unit that divides it."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def rule_text(s: dict[str, Any]) -> str:
    """When a schedule fires: ``cron 0 3 * * * (Europe/Paris)`` or ``every 10m``."""
    if s.get("cron"):
        return f"cron {s['cron']} ({s.get('timezone') or 'UTC'})"
    return f"every {every_text(int(s.get('every') or 0))}"


def _zone(s: dict[str, Any]) -> tzinfo | None:
    """The zone a schedule's times are shown in: a cron schedule's own, else local time
    (None)."""
    if not s.get("cron"):
        return None
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(str(s.get("timezone") or "UTC"))
    except (ValueError, KeyError, OSError):  # no zone data on this machine: local time
        return None


def when_text(ts: str | None, zone: tzinfo | None) -> str:
    """An API time in ``zone`` (local time for None), as ``2026-12-02 03:00:00 CET``."""
    if not ts:
        return "-"
    try:
        d = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    d = d.astimezone(zone)
    return d.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def table(rows: list[dict[str, Any]]) -> str:
    """The schedules as an aligned table (text from the server made safe to print)."""
    if not rows:
        return "no schedules are configured (add [schedules.NAME] tables to the config)"
    head = ("NAME", "TASK", "WHEN", "NEXT RUN", "LAST RUN", "LAST JOB")
    lines: list[tuple[str, ...]] = [head]
    for s in rows:
        zone = _zone(s)
        nxt = when_text(s.get("next_run"), zone) if s.get("enabled") else "disabled"
        last_job = (s.get("last_job") or "-")[:8]
        lines.append(tuple(display.clean(str(v)) for v in (
            s.get("name"), s.get("task"), rule_text(s), nxt,
            when_text(s.get("last_run"), zone), last_job)))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in lines)


@click.command(short_help="List the schedules, with their next and latest runs.",
               epilog="\b\nExample:\n  bulkrunner schedules")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@global_options
@pass_ctx
def schedules(obj: Ctx, as_json: bool) -> None:
    """List the schedules the server fires ([schedules.NAME] in its config): when each
    fires, its next run (in its time zone for a cron schedule, else local time), and its
    latest run with the job it submitted."""
    listing = obj.client.schedules()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    click.echo(table(listing["schedules"]))
