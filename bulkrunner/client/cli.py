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

import codecs
import importlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, NoReturn, TextIO, TypeVar

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
from bulkrunner.config import (
    EXECUTOR_TYPES,
    TOKEN_ENV,
    URL_ENV,
    Config,
    find_config_file,
    load_config,
)
from bulkrunner.errors import ApiError
from bulkrunner.models import FINISHED, STATES, ParamSpec


class Ctx:
    """What every command shares: the options of the group, and a lazily made client."""

    def __init__(self, config: str | None, url: str | None, token: str | None) -> None:
        self.config_path = config
        self.url_opt = url
        self.token_opt = token
        self._config: Config | None = None
        self._client: Client | None = None

    @property
    def config(self) -> Config:
        """The configuration, loaded from the config file on first use."""
        if self._config is None:
            self._config = load_config(find_config_file(self.config_path))
        return self._config

    @property
    def client(self) -> Client:
        """The client for the server, made on first use (``--url`` and token or the config)."""
        if self._client is None:
            url = self.url_opt or self.config.url
            token = self.token_opt or (self.config.server.token or None)
            try:
                self._client = Client(url, token)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--url") from None
        return self._client

    def override(self, attr: str, value: str) -> None:
        """Set ``config_path``, ``url_opt`` or ``token_opt`` from a command's own option."""
        setattr(self, attr, value)
        self._config = None if attr == "config_path" else self._config
        self.close()  # a client made before would talk to the old URL or with the old token

    def close(self) -> None:
        """Close the client, if one was made."""
        if self._client is not None:
            self._client.close()
            self._client = None


pass_ctx = click.make_pass_decorator(Ctx)

F = TypeVar("F", bound=Callable[..., Any])

#: The group's options, which every command takes as well (``bulkrunner serve --config F``
#: is ``bulkrunner --config F serve``): (option name, Ctx attribute, metavar, help).
_GLOBAL_OPTIONS = (
    ("--config", "config_path", "FILE",
     "Config file (default: $BULKRUNNER_CONFIG, else ./bulkrunner.toml)."),
    ("--url", "url_opt", "URL",
     "Server URL (default: $BULKRUNNER_URL, else the config's host and port)."),
    ("--token", "token_opt", "TOKEN", "API token (default: $BULKRUNNER_TOKEN)."),
)


def _merge_global(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """A global option given after the command: it wins over the group's (and its
    environment variable), in the :class:`Ctx` every command shares."""
    if value is None:
        return
    obj = ctx.find_object(Ctx)
    if obj is None:  # the command invoked on its own, without the group
        obj = ctx.obj = Ctx(None, None, None)
        ctx.call_on_close(obj.close)
    obj.override(str(param.name), value)


def global_options(f: F) -> F:
    """Add the group's --config, --url and --token to a command (shown in its --help)."""
    for name, attr, metavar, help_text in reversed(_GLOBAL_OPTIONS):
        f = click.option(name, attr, metavar=metavar, help=help_text, expose_value=False,
                         callback=_merge_global)(f)
    return f


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
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job and show progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@global_options
@pass_ctx
def submit(obj: Ctx, task: str | None, params: tuple[str, ...], items_path: str | None,
           priority: int | None, max_attempts: int | None, timeout: float | None,
           key: str | None, wait_: bool, as_json: bool) -> None:
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
    try:
        if items_path:
            data, name = read_items(items_path)
            job = client.submit_file(data, name, task, values, priority=priority,
                                     max_attempts=max_attempts, timeout=timeout, key=key)
        else:
            job = client.submit(task, values, priority=priority, max_attempts=max_attempts,
                                timeout=timeout, key=key)
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
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state (list).")
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
    click.echo(json.dumps(job, indent=2) if as_json else display.summary(job))


def _stderr() -> TextIO:
    """Where progress is drawn (a seam for tests; click 8.5 deprecates its stream getters)."""
    return sys.stderr


def _stdout_isatty() -> bool:
    """Whether stdout is a terminal (a seam for tests, like :func:`_stderr`)."""
    return sys.stdout.isatty()


def _write_text(chunks: Iterable[bytes], out: IO[bytes]) -> None:
    """Copy UTF-8 ``chunks`` to ``out`` through :func:`display.clean`: control characters but
    newline and tab are escaped, and bytes that are not UTF-8 show as ``\\xNN``. A character
    split between two chunks is decoded whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            out.write(display.clean(text).encode())
            out.flush()
    if tail := decoder.decode(b"", final=True):
        out.write(display.clean(tail).encode())
        out.flush()


class _RowCounter:
    """Counts the records of an export as it streams by: JSON Lines lines, or CSV rows
    after the header (a quoted cell may hold a newline, so CSV is parsed, not split)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._lines = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # CSV text after the last complete row

    def feed(self, chunk: bytes) -> None:
        """Count the records complete in ``chunk`` (with what came before)."""
        if self.fmt != "csv":
            self._lines += chunk.count(b"\n")
            return
        text = self._pending + self._decoder.decode(chunk)
        # A newline ends a row unless it is inside quotes: an even count of quotes before it.
        start = 0
        at = text.find("\n")
        while at != -1:
            if text.count('"', start, at) % 2 == 0:
                self._lines += 1
                start = at + 1
            at = text.find("\n", at + 1)
        self._pending = text[start:]

    def rows(self) -> int:
        """The records counted (the CSV header row not among them)."""
        tail = self._pending.strip() if self.fmt == "csv" else ""
        n = self._lines + (1 if tail else 0)
        return max(n - 1, 0) if self.fmt == "csv" else n

    def describe(self) -> str:
        """'200 rows (CSV)' or '200 lines (JSON Lines)'."""
        n = self.rows()
        if self.fmt == "csv":
            return f"{n} row{'' if n == 1 else 's'} (CSV)"
        return f"{n} line{'' if n == 1 else 's'} (JSON Lines)"


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


@cli.command(short_help="Show a job's items with their results or errors.",
             epilog="\b\nExample:\n  bulkrunner items 3f2a --state failed --limit 20")
@click.argument("ident", metavar="ID")
@click.option("--state", type=click.Choice(STATES), help="Only the items in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Show at most N items (read a page at a time).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@global_options
@pass_ctx
def items(obj: Ctx, ident: str, state: str | None, limit: int, as_json: bool) -> None:
    """Show a job's items: index, state, attempts, params, and the result or error.

    Params and results are compact JSON, cut to fit the terminal; --json prints the items
    whole, with the `next` cursor of any items past --limit.
    """
    client = obj.client
    got: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = client.items(ident, state=state, limit=min(limit - len(got), 1000), after=after)
        got += page["items"]
        after = page["next"]
        if after is None or len(got) >= limit:
            break
    if as_json:
        click.echo(json.dumps({"items": got, "next": after}, indent=2))
        return
    click.echo(display.items_table(got) if got else
               f"no {state} items" if state else "no items")
    if after is not None:
        click.echo(display.clean(f"… more items after index {after}; raise --limit to see "
                                 "them"), err=True)


@cli.command(short_help="Download every item's params, state, result and error.",
             epilog="\b\nExample:\n  bulkrunner results 3f2a --format csv --output results.csv")
@click.argument("ident", metavar="ID")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--state", type=click.Choice(STATES), help="Only the items in this state.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write to FILE instead of stdout.")
@global_options
@pass_ctx
def results(obj: Ctx, ident: str, fmt: str, state: str | None, output: str | None) -> None:
    """Download every item's params, state, result and error (--state: only those items).

    The export is data, so it is copied byte for byte to FILE or to a pipe; only on a
    terminal are its control characters shown as escapes (a CSV cell holds an item's error
    message as the task raised it).
    """
    client = obj.client
    # state= only when given: the call without it is the one every client has always had.
    download = (client.results(ident, fmt, state=state) if state else
                client.results(ident, fmt))
    with download:  # raises before any file is created
        if output:
            try:
                f = open(output, "wb")  # noqa: SIM115 (closed below; open errors are input errors)
            except OSError as e:
                raise CliError(f"cannot write {output}: {e.strerror}") from None
            try:
                with f:
                    counter = _RowCounter(fmt)
                    for chunk in download:
                        f.write(chunk)
                        counter.feed(chunk)
            except BaseException:
                Path(output).unlink(missing_ok=True)  # no half file that looks complete
                raise
            click.echo(display.clean(f"wrote {counter.describe()} to {output}"), err=True)
        elif _stdout_isatty():
            _write_text(download, sys.stdout.buffer)
        else:
            out = sys.stdout.buffer
            for chunk in download:
                out.write(chunk)
            out.flush()


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
@cli.command(short_help="Print what an item printed and logged (--follow: as it runs).",
             epilog="\b\nExample:\n  bulkrunner logs 3f2a --item 7 --follow")
@click.argument("ident", metavar="ID")
@click.option("--item", "index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which item of the job.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the item finishes.")
@global_options
@pass_ctx
def logs(obj: Ctx, ident: str, index: int, follow: bool) -> None:
    """Print what an item printed and logged while it ran (--follow: as it runs).

    The log is text for reading, shown the same way to a terminal, a pipe or a file:
    newlines and tabs are kept; every other control character (ESC, BEL, CR, DEL, C1) and
    any byte that is not UTF-8 prints as a visible \\xNN escape.
    """
    import time

    client = obj.client

    def chunks() -> Iterable[bytes]:
        offset = 0
        while True:
            chunk = client.item_log(ident, index, after=offset)
            yield chunk.data
            offset = chunk.size
            if not follow or chunk.state in FINISHED:
                return
            time.sleep(0.25)

    _write_text(chunks(), sys.stdout.buffer)


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


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="bulkrunner")
