"""Exports of a job's items: JSON Lines as stored, or CSV laid out for a spreadsheet."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bulkrunner.models import Item, ParamSpec

#: Bytes of CSV text gathered before a chunk is yielded.
CHUNK = 64 * 1024
#: Bytes of spooled items kept in memory before the spool moves to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024
#: The first characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def jsonl_lines(items: Iterator[Item]) -> Iterator[str]:
    """One JSON object per item and line: index, params, state, attempts, result, error,
    the lines yielded about a :data:`CHUNK` at a time (a write per line would cost the
    server more than the line).

    The values are the stored ones, never altered (no defaults, no formula escaping)."""
    dumps = json.dumps
    lines: list[str] = []
    size = 0
    for it in items:
        line = dumps({"index": it.index, "params": it.params, "state": it.state.value,
                      "attempts": it.attempts, "result": it.result, "error": it.error}) + "\n"
        lines.append(line)
        size += len(line)
        if size >= CHUNK:
            yield "".join(lines)
            lines.clear()
            size = 0
    if lines:
        yield "".join(lines)


def csv_cell(v: Any) -> str:
    """A value as a CSV cell: empty for None, ``true``/``false`` for booleans, numbers as
    JSON writes them, lists and objects as JSON text, and strings as they are, except that
    one beginning with a character of :data:`FORMULA_STARTS` gets a leading ``'`` (a
    spreadsheet then shows it as text instead of running it as a formula)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return "'" + v if v.startswith(FORMULA_STARTS) else v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)  # numbers, lists, objects: never begin with a formula character


def csv_rows(items: Iterator[Item], params: Iterable[ParamSpec | str]) -> Iterator[str]:
    """CSV text of ``items``, a chunk at a time.

    Columns: ``index``, ``state``, ``attempts``; one per declared param (``params``, the
    task's signature; a bare name counts as a param without a default) holding the item's
    effective value, the param's default when the item did not give it; one ``params``
    column (``_params`` if a param is called that) holding the params the task does not
    declare as a JSON object, present only when some item has such params (a task taking
    ``**kwargs``, or a job holding params its task no longer declares); the result; and
    ``error`` as ``Type: message``.

    The result gets a column ``result.<key>`` for each key of any item's result (in the
    order the keys first appear; a key an item's result lacks is an empty cell) when every
    result is a JSON object and some object has a key. Otherwise -- scalars, lists, a mix
    of objects and other values, or no results at all -- it is one ``result`` column.
    Items without a result (queued, running, failed, cancelled) leave these cells empty; a
    result of null is the same as none. Cells are written by :func:`csv_cell`: nested
    values as JSON text, every string (param, result, error) escaped against formulas.

    The header depends on every item, so the items are read in two passes, both over the
    one iterator given (and so over the store's one snapshot -- a second call of
    ``Store.iter_items`` would take a later snapshot, in which items may have finished
    with new keys, or the job may be gone): the first pass collects the columns while
    writing each item as a JSON line to a spool (in memory up to
    :data:`SPOOL_IN_MEMORY`, then a temporary file); the second reads the spool back and
    yields the CSV a :data:`CHUNK` at a time. Memory stays bounded whatever the number of
    items; the first chunk comes once every item has been read. The spool is deleted when
    the generator finishes or is closed.
    """
    specs = [p if isinstance(p, ParamSpec) else ParamSpec(p, required=False) for p in params]
    declared = {p.name for p in specs}
    extra = "params"
    while extra in declared:  # a task may declare a param called "params"
        extra = "_" + extra
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, mode="w+", encoding="utf-8",
                                       newline="\n", prefix="bulkrunner-export-") as spool:
        has_extra, objects_only = False, True
        keys: dict[str, None] = {}  # an ordered set
        for it in items:
            others = {k: v for k, v in it.params.items() if k not in declared}
            has_extra = has_extra or bool(others)
            result = it.result
            if isinstance(result, dict):
                keys.update(dict.fromkeys(result))
            elif result is not None:
                objects_only = False
            err = it.error
            spool.write(json.dumps([
                it.index, it.state.value, it.attempts,
                [it.params.get(p.name, p.default) for p in specs],
                others, result, f"{err.get('type')}: {err.get('message')}" if err else None,
            ]) + "\n")  # ASCII: json.dumps escapes the rest, lone surrogates included
        result_keys = list(keys) if objects_only else []
        spool.seek(0)

        buf = io.StringIO()
        write = _writer(buf)
        write(["index", "state", "attempts", *(p.name for p in specs),
               *([extra] if has_extra else []),
               *([f"result.{k}" for k in result_keys] if result_keys else ["result"]),
               "error"])
        for line in spool:
            index, state, attempts, values, others, result, error = json.loads(line)
            if result_keys:
                got = result if isinstance(result, dict) else {}
                result_cells = [csv_cell(got.get(k)) for k in result_keys]
            else:
                result_cells = [csv_cell(result)]
            write([str(index), state, str(attempts), *map(csv_cell, values),
                   *([json.dumps(others) if others else ""] if has_extra else []),
                   *result_cells, csv_cell(error)])
            if buf.tell() > CHUNK:
                yield _encodable(buf.getvalue())
                buf.seek(0)
                buf.truncate()
        yield _encodable(buf.getvalue())


def _writer(buf: io.StringIO) -> Callable[[list[str]], object]:
    """A function writing a row of cells to ``buf``, lines ending in ``\\n``.

    The csv module quotes a cell holding a delimiter, a quote or a character of the line
    terminator, so with ``\\n`` a lone carriage return would go out unquoted (and end the
    row for most readers); a row with one is written with every cell quoted."""
    minimal = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(cells: list[str]) -> object:
        w = quoted if any("\r" in c for c in cells) else minimal
        return w.writerow(cells)
    return write


def _encodable(text: str) -> str:
    """``text`` with unpaired surrogates (legal in JSON strings as ``\\ud800``, but not
    encodable as UTF-8) written as backslash escapes, so the response can be encoded."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()
