"""Read an uploaded items file (CSV, TSV, JSON Lines or a JSON array) into item dicts.

CSV and TSV cells are text, so each is coerced by the task's type hint
(``ParamSpec.from_text``); JSON values are taken as they are.

A bad row or item is an :class:`InvalidSubmission` naming where it is twice over: as the
file counts (a CSV row as a spreadsheet numbers it, the header being row 1; a JSON Lines
line as an editor does) and as the item it makes, by its index from 0, as the API, the
CLI and the page number items: ``row 3 (item 1), n``. In a JSON array (the shape most tools
export) the element's position is its item index: ``item 1, n``.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, NamedTuple, NoReturn

from bulkrunner.errors import InvalidSubmission
from bulkrunner.server.tasks import Task

_MAX_ERRORS = 20


class ParsedItems(NamedTuple):
    """The items of a file, where each one is in it, and what those numbers count."""

    items: list[dict[str, Any]]
    rows: list[int]
    #: "row" (a CSV or TSV row), "line" (a JSON Lines line) or "item" (an element of a
    #: JSON array, or the one object of a file holding one).
    unit: str = "row"


def location(unit: str, row: int | None, index: int | None) -> str:
    """Where an item is, as error messages name it: ``row 3 (item 1)`` (a file's row or
    line, from 1, and the item's index, from 0), ``row 1`` (a CSV header: no item),
    ``item 1`` (an element of a JSON array, whose position is its index)."""
    if unit == "item" or row is None:
        return f"item {index}"
    return f"{unit} {row}" if index is None else f"{unit} {row} (item {index})"


def field(where: str, name: str) -> str:
    """The field ``name`` of the item or row ``where``: ``row 3 (item 1), n``."""
    return f"{where}, {name}"


def _raise(bad: dict[str, str], first: tuple[int | None, int | None]) -> NoReturn:
    """Refuse the file: ``bad`` names each problem; ``first`` is (row, index) of the first
    one, for the answer's ``details`` (either may be None)."""
    row, index = first
    extra: dict[str, Any] = {k: v for k, v in (("row", row), ("index", index))
                             if v is not None}
    raise InvalidSubmission(bad, None, **extra)


def detect_format(filename: str | None, content_type: str | None, data: bytes) -> str:
    """'csv', 'tsv', 'jsonl' or 'json' (an array, or JSON Lines: told apart by the content),
    by file extension, then content type, then the first character."""
    name = (filename or "").lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    ct = (content_type or "").lower()
    if "tab-separated" in ct:
        return "tsv"
    if "csv" in ct:
        return "csv"
    if "ndjson" in ct or "jsonl" in ct:
        return "jsonl"
    if "json" in ct:
        return "json"
    first = data.lstrip()[:1]
    return "jsonl" if first == b"{" else "json" if first == b"[" else "csv"


def parse_items(data: bytes, fmt: str, task: Task) -> ParsedItems:
    """Items and where each is in the file, from a file in format ``fmt`` (see
    :func:`detect_format`)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidSubmission({"items": f"the file is not UTF-8 text (byte {e.start}); "
                                          "save it as UTF-8"}) from None
    if fmt in ("csv", "tsv"):
        return ParsedItems(*_parse_csv(text, task, "\t" if fmt == "tsv" else ","))
    if fmt == "json":
        return _parse_json(text)
    return ParsedItems(*_parse_jsonl(text), "line")


def _parse_json(text: str) -> ParsedItems:
    """A ``.json`` file: one JSON array of item objects, one object, or JSON Lines."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidSubmission({"items": "is nested too deeply to read"}) from None
    except ValueError as e:
        if text.lstrip()[:1] == "[":
            raise InvalidSubmission({"items": f"is not a valid JSON array ({e})"}) from None
        return ParsedItems(*_parse_jsonl(text), "line")  # several lines of one object each
    if isinstance(value, dict):
        return ParsedItems([value], [1], "item")
    if not isinstance(value, list):
        raise InvalidSubmission({"items": "a .json file holds an array of objects, one per "
                                          "item (or JSON Lines: one object per line)"})
    items, rows, bad = [], [], {}
    first: tuple[int | None, int | None] = (None, None)
    for n, element in enumerate(value):
        if isinstance(element, dict):
            items.append(element)
            rows.append(n + 1)
        else:
            bad[location("item", None, n)] = "must be a JSON object of param names to values"
            if first[1] is None:
                first = (None, n)
            if len(bad) >= _MAX_ERRORS:
                break
    if bad:
        _raise(bad, first)
    return ParsedItems(items, rows, "item")


def _parse_jsonl(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    items, rows, bad = [], [], {}
    first: tuple[int | None, int | None] = (None, None)
    index = 0  # of the item the line makes: one per line that is not blank
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = location("line", n, index)
        index += 1
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            bad[where] = f"is not valid JSON ({e})"
        else:
            if isinstance(value, dict):
                items.append(value)
                rows.append(n)
            else:
                bad[where] = "must be a JSON object of param names to values"
        if bad and first[0] is None:
            first = (n, index - 1)
        if len(bad) >= _MAX_ERRORS:
            break
    if bad:
        _raise(bad, first)
    return items, rows


def _parse_csv(text: str, task: Task, delimiter: str = ","
               ) -> tuple[list[dict[str, Any]], list[int]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidSubmission({"items": f"the {kind} file is empty; its first row names the "
                                          "params"}) from None
    except csv.Error as e:
        raise InvalidSubmission({"row 1": f"is not valid {kind} ({e})"}, row=1) from None
    # The header is row 1 and makes no item: its problems name the row alone.
    header = [h.strip() for h in header]
    specs = {p.name: p for p in task.params}
    problems = {}
    for h in header:
        if not h:
            problems["row 1"] = "has an empty column name; every column names a param"
        elif h not in specs and not task.accepts_any:
            problems[field("row 1", h)] = (f"unknown param; {task.name} takes "
                                           f"{', '.join(specs) or 'no params'}")
    if len(set(header)) != len(header):
        problems["row 1"] = "names a column twice"
    if problems:
        raise InvalidSubmission(problems, row=1)
    items, rows, bad = [], [], {}
    first: tuple[int | None, int | None] = (None, None)
    n = 1
    index = 0  # of the item the row makes: one per row that is not blank
    try:
        for record in reader:
            n += 1
            if not any(c.strip() for c in record):
                continue
            where = location("row", n, index)
            index += 1
            if len(record) != len(header):
                bad[where] = f"has {len(record)} cells; the header has {len(header)}"
                if first[0] is None:
                    first = (n, index - 1)
                continue
            item: dict[str, Any] = {}
            for name, cell in zip(header, record, strict=True):
                spec = specs.get(name)
                if spec is None:
                    item[name] = cell
                    continue
                if cell == "" and (spec.type != "str" or (spec.choices is not None
                                                          and "" not in spec.choices)):
                    # An empty cell means "not given": the default or job param applies.
                    # A plain str param takes "" as its value; a Literal or Enum only
                    # when "" is one of its choices.
                    continue
                try:
                    item[name] = spec.from_text(cell)
                except ValueError as e:
                    bad[field(where, name)] = str(e)
                    if first[0] is None:
                        first = (n, index - 1)
            items.append(item)
            rows.append(n)
            if len(bad) >= _MAX_ERRORS:
                break
    except csv.Error as e:
        # Raised while reading the record after row n (a cell over the field size limit,
        # a stray quote), before the loop counted it.
        bad[location("row", n + 1, index)] = f"is not valid {kind} ({e})"
        if first[0] is None:
            first = (n + 1, index)
    if bad:
        _raise(bad, first)
    return items, rows
