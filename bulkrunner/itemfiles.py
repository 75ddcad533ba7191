"""Read an uploaded items file (CSV or JSON Lines) into item dicts.

CSV cells are text, so each is coerced by the task's type hint (``ParamSpec.from_text``);
JSON Lines values are taken as they are. Rows are numbered as a spreadsheet numbers them:
the CSV header is row 1, and in JSON Lines row N is line N. A bad row is an
:class:`InvalidSubmission` naming the row and the field.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from bulkrunner.errors import InvalidSubmission
from bulkrunner.tasks import Task

_MAX_ERRORS = 20


def detect_format(filename: str | None, content_type: str | None, data: bytes) -> str:
    """'csv' or 'jsonl', by file extension, then content type, then the first character."""
    name = (filename or "").lower()
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    ct = (content_type or "").lower()
    if "csv" in ct:
        return "csv"
    if "json" in ct:
        return "jsonl"
    return "jsonl" if data.lstrip()[:1] == b"{" else "csv"


def parse_items(data: bytes, fmt: str, task: Task) -> tuple[list[dict[str, Any]], list[int]]:
    """Items and their row numbers from a CSV or JSON Lines file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidSubmission({"items": f"the file is not UTF-8 text (byte {e.start}); "
                                          "save it as UTF-8"}) from None
    return _parse_csv(text, task) if fmt == "csv" else _parse_jsonl(text)


def _parse_jsonl(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    items, rows, bad = [], [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            bad[f"row {n}"] = f"is not valid JSON ({e})"
        else:
            if isinstance(value, dict):
                items.append(value)
                rows.append(n)
            else:
                bad[f"row {n}"] = "must be a JSON object of param names to values"
        if len(bad) >= _MAX_ERRORS:
            break
    if bad:
        raise InvalidSubmission(bad, row=_first_row(bad))
    return items, rows


def _parse_csv(text: str, task: Task) -> tuple[list[dict[str, Any]], list[int]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidSubmission({"items": "the CSV file is empty; its first row names the "
                                          "params"}) from None
    except csv.Error as e:
        raise InvalidSubmission({"row 1": f"is not valid CSV ({e})"}, row=1) from None
    header = [h.strip() for h in header]
    specs = {p.name: p for p in task.params}
    problems = {}
    for h in header:
        if not h:
            problems["row 1"] = "has an empty column name; every column names a param"
        elif h not in specs and not task.accepts_any:
            problems[f"row 1.{h}"] = (f"unknown param; {task.name} takes "
                                      f"{', '.join(specs) or 'no params'}")
    if len(set(header)) != len(header):
        problems["row 1"] = "names a column twice"
    if problems:
        raise InvalidSubmission(problems, row=1)
    items, rows, bad = [], [], {}
    n = 1
    try:
        for record in reader:
            n += 1
            if not any(c.strip() for c in record):
                continue
            if len(record) != len(header):
                bad[f"row {n}"] = f"has {len(record)} cells; the header has {len(header)}"
                continue
            item: dict[str, Any] = {}
            for name, cell in zip(header, record, strict=True):
                spec = specs.get(name)
                if spec is None:
                    item[name] = cell
                    continue
                if cell == "" and spec.type != "str":
                    continue  # an empty cell means "not given": the default or job param
                try:
                    item[name] = spec.from_text(cell)
                except ValueError as e:
                    bad[f"row {n}.{name}"] = str(e)
            items.append(item)
            rows.append(n)
            if len(bad) >= _MAX_ERRORS:
                break
    except csv.Error as e:
        bad[f"row {n}"] = f"is not valid CSV ({e})"
    if bad:
        raise InvalidSubmission(bad, row=_first_row(bad))
    return items, rows


def _first_row(bad: dict[str, str]) -> int:
    return min(int(k.split()[1].split(".")[0]) for k in bad)
