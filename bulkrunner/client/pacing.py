"""The commands that hold work back and let it go: ``pause`` and ``resume`` (a job, or a
task with ``--task``), and what ``submit --delay`` / ``--at`` send."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import click

from bulkrunner.client import display
from bulkrunner.client.options import Ctx, global_options, pass_ctx
from bulkrunner.config import parse_duration
from bulkrunner.errors import ConfigError

_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")


def start_options(delay: str | None, at: str | None,
                  now: datetime | None = None) -> dict[str, Any]:
    """The submit body's ``delay`` (seconds) or ``run_after`` (ISO 8601 with a zone) from
    ``--delay DURATION`` or ``--at TIME``; a time without a zone is local time, and a bare
    ``HH:MM`` is the next such time."""
    if delay is not None and at is not None:
        raise click.UsageError("give --delay or --at, not both")
    if delay is not None:
        try:
            seconds = parse_duration(delay, "--delay")
        except ConfigError:
            seconds = None
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise click.BadParameter(f'{delay!r} is not a duration; use "90s", "10m", '
                                     '"2h", "1d" or a number of seconds', param_hint="--delay")
        return {"delay": float(seconds)}
    if at is None:
        return {}
    local_now = (now or datetime.now()).astimezone()
    m = _CLOCK.match(at)
    if m:
        h, mi, sec = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if h > 23 or mi > 59 or sec > 59:
            raise click.BadParameter(f"{at!r} is not a time of day", param_hint="--at")
        when = local_now.replace(hour=h, minute=mi, second=sec, microsecond=0)
        if when <= local_now:
            when += timedelta(days=1)
    else:
        try:
            when = datetime.fromisoformat(at.strip())
        except ValueError:
            raise click.BadParameter(f"{at!r} is not a time; use 2026-12-02T03:00 (local "
                                     "time), 2026-12-02T03:00Z, or 03:00",
                                     param_hint="--at") from None
        if when.tzinfo is None:
            when = when.astimezone()  # local time, as the user reads their clock
    return {"run_after": when.isoformat()}


def _act(obj: Ctx, ident: str | None, task: str | None, pausing: bool,
         as_json: bool) -> None:
    if (ident is None) == (task is None):
        raise click.UsageError("give a job ID or --task NAME (one of the two)")
    client = obj.client
    if task is not None:
        out = client.pause_task(task) if pausing else client.resume_task(task)
        if as_json:
            click.echo(json.dumps(out, indent=2))
            return
        verb = "paused" if out.get("paused") else "resumed"
        click.echo(display.clean(f"task {out['name']} {verb}"
                                 + (": none of its items starts until it is resumed"
                                    if out.get("paused") else "")))
        return
    assert ident is not None
    job = client.pause(ident) if pausing else client.resume(ident)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    c = job["items"]
    if pausing:
        text = (f"paused {job['id']}: {c['queued']} item(s) wait"
                + (f", {c['running']} running will finish" if c["running"] else ""))
    else:
        text = f"resumed {job['id']}: {c['queued']} item(s) queued"
    click.echo(display.clean(text))


@click.command(short_help="Pause a job or a task: queued items wait, running ones finish.",
               epilog="\b\nExamples:\n  bulkrunner pause 3f2a\n"
                      "  bulkrunner pause --task report")
@click.argument("ident", metavar="[ID]", required=False)
@click.option("--task", metavar="NAME", help="Pause a task instead: none of its items starts.")
@click.option("--json", "as_json", is_flag=True, help="Print the job (or task) as JSON.")
@global_options
@pass_ctx
def pause(obj: Ctx, ident: str | None, task: str | None, as_json: bool) -> None:
    """Pause a job (by id or unique prefix), or with --task a whole task. Queued items
    stay queued and spend no attempt; running items finish. A pause lasts across restarts
    until `bulkrunner resume`."""
    _act(obj, ident, task, True, as_json)


@click.command(short_help="Resume a paused job or task.",
               epilog="\b\nExamples:\n  bulkrunner resume 3f2a\n"
                      "  bulkrunner resume --task report")
@click.argument("ident", metavar="[ID]", required=False)
@click.option("--task", metavar="NAME", help="Resume a task instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the job (or task) as JSON.")
@global_options
@pass_ctx
def resume(obj: Ctx, ident: str | None, task: str | None, as_json: bool) -> None:
    """Resume a paused job (by id or unique prefix), or with --task a paused task."""
    _act(obj, ident, task, False, as_json)
