"""The ``bulkrunner`` command. ``serve`` runs the server under waitress; every other command
talks to it over HTTP through :class:`~bulkrunner.client.Client` and loads no server code.

Exit codes: 0 success; 1 the job ended failed or cancelled; 2 usage or
input error, including a 4xx from the server; 3 the server cannot be reached; 4
``wait --timeout`` elapsed.

Errors follow click's design: a command raises a :class:`CliError` (a
:class:`click.ClickException` that carries its exit code and prints ``error: <message>`` on
stderr), and :class:`BulkrunnerGroup` turns bulkrunner's own errors
(:class:`~bulkrunner.errors.ApiError`, :class:`~bulkrunner.errors.ServerUnreachable`,
:class:`~bulkrunner.errors.ConfigError`, any other
:class:`~bulkrunner.errors.BulkrunnerError`) into one, in one place, so commands just call the
client. The job-state exits (0, or 1 for a failed or cancelled job) are ``ctx.exit(code)``.

Text from the server is printed through :func:`bulkrunner.client.display.clean` (control
characters shown as ``\\x1b``-style escapes) in human output; ``--json`` output is
``json.dumps`` with its default ``ensure_ascii``, which escapes every control character.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, NoReturn, TextIO

import click

from bulkrunner.client import display
from bulkrunner.client.api import Client
from bulkrunner.client.exits import (
    BulkrunnerGroup,
    CliError,
    WaitTimeout,
    exit_for,
    param_hints,
    translate,
)
from bulkrunner.client.inputs import parse_params, read_items
from bulkrunner.client.options import Ctx, global_options, pass_ctx
from bulkrunner.client.pacing import pause, resume, start_options
from bulkrunner.client.reading import items, logs, results
from bulkrunner.client.schedules import schedules
from bulkrunner.config import (
    EXECUTOR_TYPES,
    TOKEN_ENV,
    URL_ENV,
)
from bulkrunner.errors import ApiError
from bulkrunner.models import FINISHED, JOB_STATES, ParamSpec


@click.group(cls=BulkrunnerGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                    "max_content_width": 100})
@click.option("--config", "config", metavar="FILE", envvar="BULKRUNNER_CONFIG",
              help="Config file (default: $BULKRUNNER_CONFIG, else ./bulkrunner.toml).")
@click.option("--url", metavar="URL", envvar=URL_ENV,
              help="Server URL (default: $BULKRUNNER_URL, else the config's host and port).")
@click.option("--token", metavar="TOKEN", envvar=TOKEN_ENV,
              help="API token (default: $BULKRUNNER_TOKEN).")
@click.version_option(package_name="bulkrunner")
@click.pass_context
def cli(ctx: click.Context, config: str | None, url: str | None, token: str | None) -> None:
    """bulkrunner: durable bulk jobs for plain Python functions.

    Start the server with `bulkrunner serve`, then submit work with
    `bulkrunner submit TASK --param k=v` and follow it with `bulkrunner wait ID`.
    """
    ctx.obj = Ctx(config, url, token)
    ctx.call_on_close(ctx.obj.close)


# --------------------------------------------------------------------------- serve
@cli.command(short_help="Run the job server until SIGTERM or Ctrl-C.",
             epilog="\b\nExample:\n  bulkrunner serve --config bulkrunner.toml --port 8470")
@click.option("--host", help="Interface to listen on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (0 picks a free one).")
@click.option("--executor", type=click.Choice(EXECUTOR_TYPES), help="Where items run.")
@click.option("--max-workers", type=click.IntRange(min=1), help="Items running at once.")
@click.option("--db", "db", metavar="PATH", help="SQLite database file.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]),
              help="Server log lines as text, or one JSON object each.")
@global_options
@pass_ctx
def serve(obj: Ctx, host: str | None, port: int | None, executor: str | None,
          max_workers: int | None, db: str | None, log_level: str, log_format: str) -> None:
    """Run the job server (waitress) until SIGTERM or Ctrl-C."""
    # The one command that runs the server: its code is loaded only here, so every other
    # command starts without Flask, waitress or sqlite3.
    run_server = importlib.import_module("bulkrunner.server.run").run_server
    cfg = obj.config.with_overrides(  # a ConfigError here or from run_server is exit 2
        server={"host": host, "port": port},
        executor={"type": executor, "max_workers": max_workers},
        store={"path": db})
    run_server(cfg, log_level=log_level, log_format=log_format)


# --------------------------------------------------------------------------- submit
@cli.command(short_help="Submit a job and print its id (--wait: follow it to the end).",
             epilog="\b\nExamples:\n  bulkrunner submit resize --items images.csv "
                    "--param width=640 --wait\n"
                    "  ID=$(bulkrunner submit report -p month=2024-05)\n\n"
                    "\b\nExit codes:\n"
                    "  0  submitted (with --wait: the job succeeded)\n"
                    "  1  with --wait: the job failed or was cancelled\n"
                    "  2  usage or input error, or the server refused the job (4xx)\n"
                    "  3  the server cannot be reached, or answered 5xx")
@click.argument("task", required=False)
@click.option("--param", "-p", "params", multiple=True, metavar="K=V",
              help="A param, coerced by the task's type hint; K:=JSON passes JSON as is.")
@click.option("--items", "items_path", metavar="FILE|-",
              help="Items file, one item per row or line: .csv, .tsv, .jsonl/.ndjson "
                   "(JSON Lines) or .json (an array); '-' is JSON Lines on stdin.")
@click.option("--priority", type=int, help="Higher runs first (default 0).")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Attempts per item.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds per attempt.")
@click.option("--key", help="Idempotency key: the same key and body return the same job.")
@click.option("--delay", metavar="DURATION",
              help='Start no item before this long from now: "90s", "10m", "2h" or seconds.')
@click.option("--at", "at", metavar="TIME",
              help="Start no item before TIME: 2026-12-02T03:00 (local time unless a zone "
                   "is given, like Z or +01:00), or 03:00 (the next such time).")
@click.option("--notify", "notify_url", metavar="URL",
              help="POST the job to URL when it ends (a webhook; the server allows only "
                   "URLs under its [notify] allowed prefixes).")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job and show progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@global_options
@pass_ctx
def submit(obj: Ctx, task: str | None, params: tuple[str, ...], items_path: str | None,
           priority: int | None, max_attempts: int | None, timeout: float | None,
           key: str | None, delay: str | None, at: str | None, notify_url: str | None,
           wait_: bool, as_json: bool) -> None:
    """Submit a job; prints its id (so ID=$(bulkrunner submit ...) works).

    TASK is a task name (see `bulkrunner tasks`), the server's default one if left out.
    --param sets a param of every item; --items gives one item per row of a .csv or .tsv
    file (a header row names the params), per line of a .jsonl or .ndjson file (one JSON
    object each), or per element of a .json array; the format goes by the file's extension.
    """
    client = obj.client
    cache: dict[str, ParamSpec] | None = None

    def specs() -> dict[str, ParamSpec]:
        nonlocal cache
        if cache is None:
            listing = client.tasks()
            name = task or listing.get("default")
            found = next((t for t in listing["tasks"] if t["name"] == name), None)
            cache = {p["name"]: ParamSpec.from_dict(p) for p in found["params"]} if found else {}
        return cache

    values = parse_params(params, specs)
    options: dict[str, Any] = start_options(delay, at)
    if notify_url is not None:
        options["notify_url"] = notify_url
    try:
        if items_path:
            data, name = read_items(items_path)
            job = client.submit_file(data, name, task, values, priority=priority,
                                     max_attempts=max_attempts, timeout=timeout, key=key,
                                     **options)
        else:
            job = client.submit(task, values, priority=priority, max_attempts=max_attempts,
                                timeout=timeout, key=key, **options)
    except ApiError as e:
        hints = param_hints(e, specs) if e.status == 422 else []
        if not hints:
            raise
        raise CliError("\n".join([translate(e).message, *hints])) from e
    if wait_:
        if not as_json:
            click.echo(display.clean(job["id"]))
        _wait_and_exit(client, job["id"], None, as_json)
    click.echo(json.dumps(job, indent=2) if as_json else display.clean(job["id"]))


# --------------------------------------------------------------------------- status / wait
@cli.command(short_help="Show one job, or a table of recent jobs.",
             epilog="\b\nExample:\n  bulkrunner status 3f2a --watch")
@click.argument("ident", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.option("--watch", is_flag=True, help="Redraw until the job finishes.")
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state (list).")
@click.option("--task", help="Only jobs of this task (list).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many jobs to list.")
@global_options
@pass_ctx
def status(obj: Ctx, ident: str | None, as_json: bool, watch: bool, state: str | None,
           task: str | None, limit: int) -> None:
    """Show one job (by id or unique prefix), or a table of recent jobs."""
    client = obj.client
    if ident is None:
        page = client.jobs(state=state, task=task, limit=limit)
        click.echo(json.dumps(page, indent=2) if as_json else display.table(page["jobs"]))
        return
    if watch:
        import time

        tty = sys.stdout.isatty()
        while True:
            job = client.job(ident)
            text = json.dumps(job, indent=2) if as_json else display.summary(job)
            if tty:
                click.echo("\x1b[H\x1b[2J" + text)
            if job["state"] in FINISHED:
                if not tty:
                    click.echo(text)
                exit_for(job)
            time.sleep(0.5)
    job = client.job(ident)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    pace = client.pace(job["id"]) if job["state"] not in FINISHED else None
    click.echo(display.summary(job, pace))


def _stderr() -> TextIO:
    """Where progress is drawn (a seam for tests; click 8.5 deprecates its stream getters)."""
    return sys.stderr


def _wait_and_exit(client: Client, ident: str, timeout: float | None, as_json: bool) -> NoReturn:
    err = _stderr()
    bar = display.ProgressLine(tty=err.isatty())

    def show(job: dict[str, Any]) -> None:
        text = bar.update(job)
        if text:
            err.write(text)
            err.flush()

    try:
        job = client.wait(ident, timeout=timeout, on_update=show)
    except TimeoutError as e:
        if bar.tty:
            err.write("\n")
        raise WaitTimeout(str(e)) from None
    if bar.tty:
        err.write("\n")
    if as_json:
        click.echo(json.dumps(job, indent=2))
    elif job["state"] != "succeeded":
        click.echo(display.summary(job), err=True)
    exit_for(job)


@cli.command(short_help="Wait for a job to finish; the exit code says how it ended.",
             epilog="\b\nExample:\n  bulkrunner wait 3f2a --timeout 600 || echo \"not done, "
                    "or failed\"\n\n\b\nExit codes:\n  0  the job succeeded\n"
                    "  1  the job failed or was cancelled\n  2  usage error, or no such job\n"
                    "  3  the server cannot be reached\n  4  --timeout elapsed")
@click.argument("ident", metavar="ID")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after SECONDS (exit 4).")
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@global_options
@pass_ctx
def wait(obj: Ctx, ident: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to finish: exit 0 if it succeeded, 1 if it failed or was cancelled."""
    _wait_and_exit(obj.client, ident, timeout, as_json)


# --------------------------------------------------------------------------- actions
_QUIET_HELP = ("Print only the job's id on stdout, the sentence on stderr "
               "(ID=$(bulkrunner retry -q ...)).")


def _said(job: dict[str, Any], sentence: str, id_only: bool) -> None:
    """What ``cancel`` and ``retry`` did: the sentence on stdout, or (``id_only``) the job's
    id alone on stdout and the sentence on stderr."""
    click.echo(display.clean(sentence), err=id_only)
    if id_only:
        click.echo(display.clean(job["id"]))


@cli.command(short_help="Cancel a job: queued items never run, running ones stop.",
             epilog="\b\nExamples:\n  bulkrunner cancel 3f2a\n"
                    "  ID=$(bulkrunner cancel -q 3f2a)")
@click.argument("ident", metavar="ID")
@click.option("--quiet", "-q", "id_only", is_flag=True, help=_QUIET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@global_options
@pass_ctx
def cancel(obj: Ctx, ident: str, id_only: bool, as_json: bool) -> None:
    """Cancel a job: queued items never run, running ones are stopped."""
    job = obj.client.cancel(ident)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    _said(job, f"cancelled {job['id']} ({job['items']['cancelled']} item(s) cancelled)",
          id_only)


@cli.command(short_help="Re-queue a job's failed and cancelled items (--wait: follow it).",
             epilog="\b\nExamples:\n  bulkrunner retry 3f2a --wait\n"
                    "  ID=$(bulkrunner retry -q 3f2a)")
@click.argument("ident", metavar="ID")
@click.option("--wait", "wait_", is_flag=True,
              help="Then wait for the job, like `wait` (exit 0 succeeded, 1 failed); "
                   "stdout has only the id, as with --quiet.")
@click.option("--timeout", type=click.FloatRange(min=0),
              help="With --wait: give up after SECONDS (exit 4).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the job as JSON (with --wait: the finished job).")
@click.option("--quiet", "-q", "id_only", is_flag=True, help=_QUIET_HELP)
@global_options
@pass_ctx
def retry(obj: Ctx, ident: str, wait_: bool, timeout: float | None, as_json: bool,
          id_only: bool) -> None:
    """Re-queue a job's failed and cancelled items; succeeded ones are kept.

    With --wait, follows the job to its end and exits as `wait` does.
    """
    if timeout is not None and not wait_:
        raise click.UsageError("--timeout goes with --wait")
    job = obj.client.retry(ident)
    if not as_json:
        _said(job, f"retrying {job['id']}: {job['items']['queued']} item(s) queued again",
              id_only or wait_)
    if wait_:
        _wait_and_exit(obj.client, job["id"], timeout, as_json)
    if as_json:
        click.echo(json.dumps(job, indent=2))


@cli.command(short_help="List the tasks the server runs, with their params.",
             epilog="\b\nExample:\n  bulkrunner tasks")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@global_options
@pass_ctx
def tasks(obj: Ctx, as_json: bool) -> None:
    """List the tasks the server runs, with their params."""
    listing = obj.client.tasks()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for t in listing["tasks"]:
        default = " (default)" if t["name"] == listing.get("default") else ""
        click.echo(display.clean(f"{t['name']}{default}"))
        doc = display.clean(t.get("doc") or "").strip().split("\n")
        if doc[0]:
            click.echo(f"    {doc[0]}")
        for p in t["params"]:
            req = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            choices = f", one of {p['choices']}" if p.get("choices") else ""
            click.echo(display.clean(f"    --param {p['name']}=<{p['type']}>  ({req}{choices})"))


# --------------------------------------------------------------------------- observability
@cli.command(short_help="Delete finished jobs past the server's retention ages.",
             epilog="\b\nExample:\n  bulkrunner prune --dry-run")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@global_options
@pass_ctx
def prune(obj: Ctx, dry_run: bool, as_json: bool) -> None:
    """Delete finished jobs older than the server's [retention] ages, with their items and
    logs (the server also does this every few minutes)."""
    res = obj.client.prune(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    jobs, items = res["jobs"], res["items"]
    verb = "would delete" if res["dry_run"] else "deleted"
    detail = ", ".join(f"{jobs[s]} {s}" for s in jobs)
    click.echo(display.clean(f"{verb} {sum(jobs.values())} job(s) with "
                             f"{sum(items.values())} item(s) ({detail})"))


for _command in (items, results, logs, pause, resume, schedules):
    cli.add_command(_command)


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="bulkrunner")
