"""The CSV export: a column per declared param with its effective value, undeclared params
in one JSON column (only when there are some), a column per result key, strings escaped
against spreadsheet formulas; and JSON Lines left as stored."""

from __future__ import annotations

import csv
import gc
import io
import json
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.models import Item, ParamSpec, State
from bulkrunner.server import export
from bulkrunner.server.export import csv_rows as _csv_rows
from tests.conftest import JOBS, SAMPLE_TASKS, wait_app_job


def export_csv(client: FlaskClient, body: dict[str, Any]) -> list[dict[str, str]]:
    r = client.post(JOBS, json=body)
    assert r.status_code == 202, r.get_data(as_text=True)
    ident = r.get_json()["id"]
    job = wait_app_job(client, ident, 20)
    assert job["state"] == "succeeded", job
    out = client.get(f"{JOBS}/{ident}/results?format=csv")
    assert out.status_code == 200
    return list(csv.DictReader(io.StringIO(out.get_data(as_text=True))))


def table(items: list[Item], params: list[ParamSpec | str]) -> list[list[str]]:
    return list(csv.reader(io.StringIO("".join(_csv_rows(iter(items), params)))))


def ok(index: int, result: Any, **params: Any) -> Item:
    return Item(index, params, State.SUCCEEDED, 1, result=result)


def test_params_of_a_kwargs_task_are_all_kept(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(tasks={**SAMPLE_TASKS, "echo": "bulkrunner.builtin:echo"}
                         ).test_client()
    rows = export_csv(client, {"task": "echo", "params": {"z": 0},
                               "items": [{"a": 1}, {"b": 2}, {"a": "x", "c": [1]}]})
    # echo returns its params: an object, so a column per key, in the order first seen.
    assert list(rows[0]) == ["index", "state", "attempts", "params", "result.z", "result.a",
                             "result.b", "result.c", "error"]
    assert [json.loads(r["params"]) for r in rows] == [
        {"z": 0, "a": 1}, {"z": 0, "b": 2}, {"z": 0, "a": "x", "c": [1]}]
    assert [[r[f"result.{k}"] for k in "zabc"] for r in rows] == [
        ["0", "1", "", ""], ["0", "", "2", ""], ["0", "x", "", "[1]"]]


def test_declared_params_get_columns(app_factory: Callable[..., Flask]) -> None:
    client = app_factory().test_client()
    rows = export_csv(client, {"task": "add", "params": {"b": 10},
                               "items": [{"a": 1}, {"a": 2, "b": 5}]})
    assert list(rows[0]) == ["index", "state", "attempts", "a", "b", "result", "error"]
    assert [(r["a"], r["b"], r["result"]) for r in rows] == [("1", "10", "11"), ("2", "5", "7")]


def test_a_param_left_to_its_default_shows_the_default(
        app_factory: Callable[..., Flask]) -> None:
    client = app_factory().test_client()
    rows = export_csv(client, {"task": "add", "items": [{"a": 799}, {"a": 1, "b": 2}]})
    assert [(r["a"], r["b"], r["result"]) for r in rows] == [("799", "1", "800"),
                                                             ("1", "2", "3")]


def test_defaults_of_every_kind_are_filled() -> None:
    specs = [ParamSpec("n", "int"), ParamSpec("name", "str", required=False, default="x"),
             ParamSpec("flag", "bool", required=False, default=False),
             ParamSpec("tags", "list", required=False, default=["a"]),
             ParamSpec("none", "any", required=False, default=None)]
    assert table([ok(0, 1, n=5), ok(1, 1, name="y", flag=True, tags=[], none=0)], specs) == [
        ["index", "state", "attempts", "n", "name", "flag", "tags", "none", "result", "error"],
        ["0", "succeeded", "1", "5", "x", "false", '["a"]', "", "1", ""],
        # a required param an item lacks (an old job) is an empty cell
        ["1", "succeeded", "1", "", "y", "true", "[]", "0", "1", ""]]


def test_the_params_column_is_there_only_when_some_item_has_undeclared_params() -> None:
    specs = [ParamSpec("a", "int")]
    assert table([ok(0, 1, a=1), ok(1, 2, a=2)], specs)[0] == [
        "index", "state", "attempts", "a", "result", "error"]
    rows = table([ok(0, 1, a=1), ok(1, 2, a=2, old=True)], specs)
    assert rows[0] == ["index", "state", "attempts", "a", "params", "result", "error"]
    assert [r[4] for r in rows[1:]] == ["", '{"old": true}']


def test_params_the_signature_no_longer_has_are_kept() -> None:
    # A job submitted before the task lost a param, or whose task was renamed.
    items = iter([Item(0, {"a": 1, "old": True}, State.SUCCEEDED, 1, result=2),
                  Item(1, {"a": 2}, State.FAILED, 1,
                       error={"type": "ValueError", "message": "no"})])
    text = "".join(_csv_rows(items, ["a", "params"]))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["index", "state", "attempts", "a", "params", "_params", "result", "error"],
                    ["0", "succeeded", "1", "1", "", '{"old": true}', "2", ""],
                    ["1", "failed", "1", "2", "", "", "", "ValueError: no"]]


def test_an_empty_export_has_the_header() -> None:
    # No item has undeclared params (there is none), so no params column.
    assert "".join(_csv_rows(iter([]), ["a"])) == "index,state,attempts,a,result,error\n"


def test_object_results_get_a_column_per_key_across_items() -> None:
    items = [ok(0, {"w": 1, "h": 2}),
             Item(1, {}, State.FAILED, 1, error={"type": "OSError", "message": "gone"}),
             ok(2, {"h": 3, "meta": {"k": [1, None]}, "name": "a,b\nc", "n": None}),
             Item(3, {}, State.QUEUED)]
    assert table(items, []) == [
        ["index", "state", "attempts", "result.w", "result.h", "result.meta", "result.name",
         "result.n", "error"],
        ["0", "succeeded", "1", "1", "2", "", "", "", ""],
        ["1", "failed", "1", "", "", "", "", "", "OSError: gone"],
        ["2", "succeeded", "1", "", "3", '{"k": [1, null]}', "a,b\nc", "", ""],
        ["3", "queued", "0", "", "", "", "", "", ""]]


@pytest.mark.parametrize("results, cells", [
    ([1, 2.5, None], ["1", "2.5", ""]),
    (["text", True, False], ["text", "true", "false"]),
    ([[1, {"a": 2}], "x"], ['[1, {"a": 2}]', "x"]),
    ([{"a": 1}, 7], ['{"a": 1}', "7"]),        # objects mixed with others: one column
    ([{"a": 1}, [2]], ['{"a": 1}', "[2]"]),
    ([{}, {}], ["{}", "{}"]),                  # objects without a key: one column
    ([None, None], ["", ""]),
])
def test_results_that_are_not_all_objects_get_one_column(results: list[Any],
                                                         cells: list[str]) -> None:
    rows = table([ok(i, r) for i, r in enumerate(results)], [])
    assert rows[0] == ["index", "state", "attempts", "result", "error"]
    assert [r[3] for r in rows[1:]] == cells


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_strings_that_a_spreadsheet_would_run_are_escaped(start: str) -> None:
    text = f"{start}HYPERLINK(\"http://x\")"
    items = [Item(0, {"a": text, "more": text}, State.SUCCEEDED, 1, result={"k": text}),
             Item(1, {"a": text}, State.FAILED, 1, result=None,
                  error={"type": start + "E", "message": "m"})]
    rows = table(items, ["a"])
    assert rows[0] == ["index", "state", "attempts", "a", "params", "result.k", "error"]
    assert rows[1][3] == rows[1][5] == "'" + text
    assert json.loads(rows[1][4]) == {"more": text}  # JSON text begins with "{"
    assert rows[2][6] == f"'{start}E: m"
    # A lone result string, too.
    assert table([ok(0, text)], [])[1][3] == "'" + text


def test_numbers_are_not_escaped_but_strings_that_look_like_them_are() -> None:
    rows = table([ok(0, {"n": -5, "f": -0.5, "s": "-5"}, a=-5, b="-5", c="a=b")], ["a", "b", "c"])
    assert rows[1][3:] == ["-5", "'-5", "a=b", "-5", "-0.5", "'-5", ""]


def test_json_lines_are_never_altered() -> None:
    item = Item(0, {"a": "=1+1", "n": -5}, State.FAILED, 2, result={"r": "@x", "t": "\tx"},
                error={"type": "E", "message": "-m"})
    line = "".join(export.jsonl_lines(iter([item])))
    assert json.loads(line) == {"index": 0, "params": {"a": "=1+1", "n": -5},
                                "state": "failed", "attempts": 2,
                                "result": {"r": "@x", "t": "\tx"},
                                "error": {"type": "E", "message": "-m"}}


def test_an_export_over_http_escapes_and_fills_defaults(
        app_factory: Callable[..., Flask]) -> None:
    client = app_factory(tasks={**SAMPLE_TASKS, "echo": "bulkrunner.builtin:echo"}
                         ).test_client()
    rows = export_csv(client, {"task": "echo", "items": [{"f": "=SUM(A1)", "n": -1}]})
    assert rows[0] == {"index": "0", "state": "succeeded", "attempts": "1",
                       "params": '{"f": "=SUM(A1)", "n": -1}', "result.f": "'=SUM(A1)",
                       "result.n": "-1", "error": ""}


class Recorder:
    """Items made on demand; counts how many were taken and keeps weak references."""

    def __init__(self, n: int, size: int = 40) -> None:
        self.n, self.size, self.taken = n, size, 0
        self.refs: list[weakref.ref[Item]] = []

    def __iter__(self) -> Iterator[Item]:
        for i in range(self.n):
            item = ok(i, {"text": "x" * self.size, "i": i}, a=i)
            self.refs.append(weakref.ref(item))
            self.taken += 1
            yield item
            del item

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


def test_a_large_export_streams_in_chunks_and_holds_no_items() -> None:
    source = Recorder(20_000)
    rows = _csv_rows(iter(source), ["a"])
    assert source.taken == 0  # nothing is read before the stream is
    first = next(rows)
    # The header needs every item's result keys, so the one iterator (the store's one
    # snapshot) was read to its end, but no item was kept (but the last, the loop's).
    assert source.taken == 20_000 and source.alive() <= 1
    assert first.startswith("index,state,attempts,a,result.text,result.i,error\n")
    chunks = [first, *rows]
    assert len(chunks) > 10
    assert all(len(c) < export.CHUNK + 200 for c in chunks)
    lines = "".join(chunks).splitlines()
    assert len(lines) == 20_001 and lines[-1] == f"19999,succeeded,1,19999,{'x' * 40},19999,"


def test_a_large_export_uses_bounded_memory() -> None:
    # 20,000 items of 500 bytes: 10 MB of CSV; the spool moves to a file past 1 MB.
    source = Recorder(20_000, size=500)
    tracemalloc.start()
    try:
        total = 0
        for chunk in _csv_rows(iter(source), ["a"]):
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 10_000_000
    assert peak < 4_000_000, peak


def test_the_spool_is_removed_when_the_stream_is_closed_early(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SPOOL_IN_MEMORY", 1000)  # straight to a file
    rows = _csv_rows(iter(Recorder(5000)), ["a"])
    next(rows)
    frame = rows.gi_frame
    assert frame is not None
    spool = frame.f_locals["spool"]
    assert spool._rolled and not spool.closed
    rows.close()
    assert spool.closed
