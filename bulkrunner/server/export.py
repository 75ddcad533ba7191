"""Exports of a job's items: JSON Lines, or CSV with a column per declared param."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from bulkrunner.models import Item


def jsonl_lines(items: Iterator[Item]) -> Iterator[str]:
    """One JSON object per item and line: index, params, state, attempts, result, error."""
    return (json.dumps({"index": it.index, "params": it.params, "state": it.state.value,
                        "attempts": it.attempts, "result": it.result,
                        "error": it.error}) + "\n" for it in items)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def csv_rows(items: Iterator[Item], names: list[str]) -> Iterator[str]:
    """CSV text of ``items``, a chunk at a time: a column for each declared param
    (``names``), then one ``params`` column holding every other param as a JSON object.

    The header comes from the task's signature, never from the items: a task taking
    ``**kwargs`` gets different params in each item, and a job may hold params its task no
    longer declares; none of them is dropped.
    """
    extra = "params"
    while extra in names:  # a task may declare a param called "params"
        extra = "_" + extra
    declared = set(names)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "state", "attempts", *names, extra, "result", "error"])
    for it in items:
        err = it.error
        others = {k: v for k, v in it.params.items() if k not in declared}
        w.writerow([it.index, it.state.value, it.attempts,
                    *(_csv_cell(it.params.get(n)) for n in names),
                    json.dumps(others) if others else "", _csv_cell(it.result),
                    f"{err.get('type')}: {err.get('message')}" if err else ""])
        if buf.tell() > 64 * 1024:
            yield _encodable(buf.getvalue())
            buf.seek(0)
            buf.truncate()
    yield _encodable(buf.getvalue())


def _encodable(text: str) -> str:
    """``text`` with unpaired surrogates (legal in JSON strings as ``\\ud800``, but not
    encodable as UTF-8) written as backslash escapes, so the response can be encoded."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()
