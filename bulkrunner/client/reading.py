"""The commands that read a job's items: ``items``, ``results`` and ``logs``.

Text from the server goes through :func:`bulkrunner.client.display.clean` before it is
printed; a download to a file or a pipe is written byte for byte.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import click

from bulkrunner.client import display
from bulkrunner.client.exits import (
    CliError,
)
from bulkrunner.client.options import Ctx, global_options, pass_ctx
from bulkrunner.models import FINISHED, STATES


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


@click.command(short_help="Show a job's items with their results or errors.",
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


@click.command(short_help="Download every item's params, state, result and error.",
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


@click.command(short_help="Print what an item printed and logged (--follow: as it runs).",
             epilog="\b\nExample:\n  bulkrunner logs 3f2a --item 7 --follow")
@click.argument("ident", metavar="ID")
@click.option("--item", "index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which item of the job, by its index from 0 (as `items` shows it).")
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
