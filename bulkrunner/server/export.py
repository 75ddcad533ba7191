"""Exports of a job's items: JSON Lines as stored, or CSV laid out for a spreadsheet."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bulkrunner.models import ParamSpec
from bulkrunner.store import ExportRows

#: Bytes of CSV text gathered before a chunk is yielded.
CHUNK = 64 * 1024
#: The first characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def jsonl_lines(rows: ExportRows) -> Iterator[str]:
    """One JSON object per item and line: index, params, state, attempts, result, error,
    the lines yielded about a :data:`CHUNK` at a time (a write per line would cost the
    server more than the line).

    The values are the stored ones, never altered (no defaults, no formula escaping): the
    stored JSON text goes out as it is, only an item's params are decoded, when the job
    has params of its own to merge under them."""
    base, base_text = rows.params, rows.params_text
    lines: list[str] = []
    size = 0
    try:
        for chunk in rows:
            for index, own, state, attempts, result, error in chunk:
                params = base_text if own is None else (
                    json.dumps({**base, **json.loads(own)}) if base else own)
                line = (f'{{"index": {index}, "params": {params}, "state": "{state}", '
                        f'"attempts": {attempts}, "result": {result or "null"}, '
                        f'"error": {error or "null"}}}\n')
                lines.append(line)
                size += len(line)
                if size >= CHUNK:
                    yield "".join(lines)
                    lines.clear()
                    size = 0
        if lines:
            yield "".join(lines)
    finally:
        rows.close()


def csv_cell(v: Any) -> str:
    """A value as a CSV cell: empty for None, ``true``/``false`` for booleans, numbers as
    JSON writes them, lists and objects as JSON text, and strings as they are, except that
    one beginning with a character of :data:`FORMULA_STARTS` gets a leading ``'`` (a
    spreadsheet then shows it as text instead of running it as a formula)."""
    t = type(v)
    if t is str:
        text: str = v
        return "'" + text if text.startswith(FORMULA_STARTS) else text
    if t is int:  # the commonest cells first; json.dumps costs several times str()
        return str(v)
    if v is None:
        return ""
    if t is bool:
        return "true" if v else "false"
    if t is float:
        return repr(v)  # what json.dumps writes (NaN and infinities are never stored)
    return json.dumps(v)  # lists, objects: never begin with a formula character


def csv_rows(rows: ExportRows, params: Iterable[ParamSpec | str]) -> Iterator[str]:
    """CSV text of ``rows``, a chunk at a time.

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

    The header depends on every item: the store works it out from the rows' snapshot
    before the first row is read, so memory stays bounded whatever the number of items.
    """
    specs = [p if isinstance(p, ParamSpec) else ParamSpec(p, required=False) for p in params]
    declared = {p.name for p in specs}
    extra = "params"
    while extra in declared:  # a task may declare a param called "params"
        extra = "_" + extra
    base = rows.params
    try:
        has_extra = rows.undeclared(declared)
        result_keys = rows.result_keys() or []
        buf = io.StringIO()
        write = _writer(buf)
        write(["index", "state", "attempts", *(p.name for p in specs),
               *([extra] if has_extra else []),
               *([f"result.{k}" for k in result_keys] if result_keys else ["result"]),
               "error"])
        loads, cell = json.loads, csv_cell
        extra_cells: list[str] = []
        defaults = [(p.name, p.default) for p in specs]
        for chunk in rows:
            for index, own, state, attempts, result_text, error_text in chunk:
                values = {**base, **loads(own)} if own else base
                result = None if result_text is None else loads(result_text)
                if result_keys:
                    got = result if isinstance(result, dict) else {}
                    result_cells = [cell(got.get(k)) for k in result_keys]
                else:
                    result_cells = [cell(result)]
                if error_text is None:
                    error = ""
                else:
                    err = loads(error_text)
                    error = cell(f"{err.get('type')}: {err.get('message')}") if err else ""
                if has_extra:
                    others = {k: v for k, v in values.items() if k not in declared}
                    extra_cells = [json.dumps(others) if others else ""]
                write([str(index), state, str(attempts),
                       *[cell(values.get(name, d)) for name, d in defaults],
                       *extra_cells, *result_cells, error])
                if buf.tell() > CHUNK:
                    yield _encodable(buf.getvalue())
                    buf.seek(0)
                    buf.truncate()
        yield _encodable(buf.getvalue())
    finally:
        rows.close()


def _writer(buf: io.StringIO) -> Callable[[list[str]], object]:
    """A function writing a row of cells to ``buf``, lines ending in ``\\n``.

    The csv module quotes a cell holding a delimiter, a quote or a character of the line
    terminator, so with ``\\n`` a lone carriage return would go out unquoted (and end the
    row for most readers); a row with one is written with every cell quoted."""
    minimal = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(cells: list[str]) -> object:
        w = quoted if "\r" in "".join(cells) else minimal
        return w.writerow(cells)
    return write


def _encodable(text: str) -> str:
    """``text`` with unpaired surrogates (legal in JSON strings as ``\\ud800``, but not
    encodable as UTF-8) written as backslash escapes, so the response can be encoded."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()
