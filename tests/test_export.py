"""The CSV export: a column per declared param with its effective value, undeclared params
in one JSON column (only when there are some), a column per result key, strings escaped
against spreadsheet formulas; and JSON Lines left as stored."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.models import Item, ParamSpec, State
from bulkrunner.server import export
from bulkrunner.server.export import csv_rows as _csv_rows
from bulkrunner.store import NewJob, Store
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


def stored(store: Store, items: list[Item], params: dict[str, Any] | None = None) -> str:
    """The id of a job of ``items`` (their params, state, attempts, result and error)
    written to ``store`` under job params ``params``."""
    ident = uuid.uuid4().hex
    own = [json.dumps(it.params) if it.params else None for it in items]
    store.insert_job(NewJob(id=ident, task="t", params=params or {}, items=own or [None]))
    seq = store.resolve_id(ident)
    store.write(lambda tx: tx.conn.executemany(
        "UPDATE items SET state = ?, attempts = ?, result = ?, error = ? "
        "WHERE job_seq = ? AND idx = ?",
        [(it.state.value, it.attempts, None if it.result is None else json.dumps(it.result),
          None if it.error is None else json.dumps(it.error), seq, it.index)
         for it in items]))
    if not items:
        store.write(lambda tx: tx.conn.execute("DELETE FROM items WHERE job_seq = ?", (seq,)))
    return ident


def table(store: Store, items: list[Item], params: list[ParamSpec | str]) -> list[list[str]]:
    text = "".join(_csv_rows(store.export_rows(stored(store, items)), params))
    return list(csv.reader(io.StringIO(text)))


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


def test_defaults_of_every_kind_are_filled(store: Store) -> None:
    specs = [ParamSpec("n", "int"), ParamSpec("name", "str", required=False, default="x"),
             ParamSpec("flag", "bool", required=False, default=False),
             ParamSpec("tags", "list", required=False, default=["a"]),
             ParamSpec("none", "any", required=False, default=None)]
    assert table(store, [ok(0, 1, n=5), ok(1, 1, name="y", flag=True, tags=[], none=0)], specs) == [
        ["index", "state", "attempts", "n", "name", "flag", "tags", "none", "result", "error"],
        ["0", "succeeded", "1", "5", "x", "false", '["a"]', "", "1", ""],
        # a required param an item lacks (an old job) is an empty cell
        ["1", "succeeded", "1", "", "y", "true", "[]", "0", "1", ""]]


def test_the_params_column_is_there_only_when_some_item_has_undeclared_params(store: Store) -> None:
    specs = [ParamSpec("a", "int")]
    assert table(store, [ok(0, 1, a=1), ok(1, 2, a=2)], specs)[0] == [
        "index", "state", "attempts", "a", "result", "error"]
    rows = table(store, [ok(0, 1, a=1), ok(1, 2, a=2, old=True)], specs)
    assert rows[0] == ["index", "state", "attempts", "a", "params", "result", "error"]
    assert [r[4] for r in rows[1:]] == ["", '{"old": true}']


def test_params_the_signature_no_longer_has_are_kept(store: Store) -> None:
    # A job submitted before the task lost a param, or whose task was renamed.
    items = [Item(0, {"a": 1, "old": True}, State.SUCCEEDED, 1, result=2),
             Item(1, {"a": 2}, State.FAILED, 1, error={"type": "ValueError", "message": "no"})]
    rows = table(store, items, ["a", "params"])
    assert rows == [["index", "state", "attempts", "a", "params", "_params", "result", "error"],
                    ["0", "succeeded", "1", "1", "", '{"old": true}', "2", ""],
                    ["1", "failed", "1", "2", "", "", "", "ValueError: no"]]


def test_an_empty_export_has_the_header(store: Store) -> None:
    # No item has undeclared params (there is none), so no params column.
    text = "".join(_csv_rows(store.export_rows(stored(store, [])), ["a"]))
    assert text == "index,state,attempts,a,result,error\n"


def test_object_results_get_a_column_per_key_across_items(store: Store) -> None:
    items = [ok(0, {"w": 1, "h": 2}),
             Item(1, {}, State.FAILED, 1, error={"type": "OSError", "message": "gone"}),
             ok(2, {"h": 3, "meta": {"k": [1, None]}, "name": "a,b\nc", "n": None}),
             Item(3, {}, State.QUEUED)]
    assert table(store, items, []) == [
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
def test_results_that_are_not_all_objects_get_one_column(
        store: Store, results: list[Any], cells: list[str]) -> None:
    rows = table(store, [ok(i, r) for i, r in enumerate(results)], [])
    assert rows[0] == ["index", "state", "attempts", "result", "error"]
    assert [r[3] for r in rows[1:]] == cells


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_strings_that_a_spreadsheet_would_run_are_escaped(store: Store, start: str) -> None:
    text = f"{start}HYPERLINK(\"http://x\")"
    items = [Item(0, {"a": text, "more": text}, State.SUCCEEDED, 1, result={"k": text}),
             Item(1, {"a": text}, State.FAILED, 1, result=None,
                  error={"type": start + "E", "message": "m"})]
    rows = table(store, items, ["a"])
    assert rows[0] == ["index", "state", "attempts", "a", "params", "result.k", "error"]
    assert rows[1][3] == rows[1][5] == "'" + text
    assert json.loads(rows[1][4]) == {"more": text}  # JSON text begins with "{"
    assert rows[2][6] == f"'{start}E: m"
    # A lone result string, too.
    assert table(store, [ok(0, text)], [])[1][3] == "'" + text


def test_numbers_are_not_escaped_but_strings_that_look_like_them_are(store: Store) -> None:
    rows = table(store, [ok(0, {"n": -5, "f": -0.5, "s": "-5"}, a=-5, b="-5", c="a=b")],
                 ["a", "b", "c"])
    assert rows[1][3:] == ["-5", "'-5", "a=b", "-5", "-0.5", "'-5", ""]


def test_json_lines_are_never_altered(store: Store) -> None:
    item = Item(0, {"a": "=1+1", "n": -5}, State.FAILED, 2, result={"r": "@x", "t": "\tx"},
                error={"type": "E", "message": "-m"})
    line = "".join(export.jsonl_lines(store.export_rows(stored(store, [item]))))
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


def test_json_lines_merge_each_items_params_over_the_jobs(store: Store) -> None:
    items = [Item(0, {"a": 1}, State.SUCCEEDED, 1, result=None),
             Item(1, {}, State.QUEUED),
             Item(2, {"b": 3, "c": [1, {"d": None}]}, State.SUCCEEDED, 1, result=[2])]
    text = "".join(export.jsonl_lines(store.export_rows(stored(store, items, params={"b": 2}))))
    assert [json.loads(line) for line in text.splitlines()] == [
        {"index": 0, "params": {"b": 2, "a": 1}, "state": "succeeded", "attempts": 1,
         "result": None, "error": None},
        {"index": 1, "params": {"b": 2}, "state": "queued", "attempts": 0,
         "result": None, "error": None},
        {"index": 2, "params": {"b": 3, "c": [1, {"d": None}]}, "state": "succeeded",
         "attempts": 1, "result": [2], "error": None}]


def test_the_export_filters_by_state(store: Store) -> None:
    items = [ok(0, {"x": 1}), Item(1, {}, State.FAILED, 1, error={"type": "E", "message": "m"}),
             ok(2, {"y": 2}, old=1)]
    ident = stored(store, items)
    rows = list(csv.reader(io.StringIO("".join(_csv_rows(
        store.export_rows(ident, state="succeeded"), [])))))
    # The header is that of the items exported: a failed item does not add its columns.
    assert rows == [["index", "state", "attempts", "params", "result.x", "result.y", "error"],
                    ["0", "succeeded", "1", "", "1", "", ""],
                    ["2", "succeeded", "1", '{"old": 1}', "", "2", ""]]
    failed = "".join(_csv_rows(store.export_rows(ident, state="failed"), []))
    assert failed == "index,state,attempts,result,error\n1,failed,1,,E: m\n"


def big_job(store: Store, n: int, size: int = 40) -> str:
    return stored(store, [ok(i, {"text": "x" * size, "i": i}, a=i) for i in range(n)])


def test_a_large_export_streams_in_chunks(store: Store) -> None:
    ident = big_job(store, 20_000)
    chunks = list(_csv_rows(store.export_rows(ident), ["a"]))
    assert chunks[0].startswith("index,state,attempts,a,result.text,result.i,error\n")
    assert len(chunks) > 10
    assert all(len(c) < export.CHUNK + 200 for c in chunks)
    lines = "".join(chunks).splitlines()
    assert len(lines) == 20_001 and lines[-1] == f"19999,succeeded,1,19999,{'x' * 40},19999,"
    jsonl = list(export.jsonl_lines(store.export_rows(ident)))
    assert len(jsonl) > 10 and all(len(c) < export.CHUNK + 200 for c in jsonl)
    assert sum(c.count("\n") for c in jsonl) == 20_000


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_large_export_uses_bounded_memory(store: Store, fmt: str) -> None:
    # 20,000 items of 500 bytes: 10 MB of CSV, more of JSON Lines.
    rows = store.export_rows(big_job(store, 20_000, size=500))
    tracemalloc.start()
    try:
        total = 0
        stream = export.jsonl_lines(rows) if fmt == "jsonl" else _csv_rows(rows, ["a"])
        for chunk in stream:
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 10_000_000
    assert peak < 4_000_000, peak


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_the_snapshot_ends_when_the_stream_is_closed_early(store: Store, fmt: str) -> None:
    rows = store.export_rows(big_job(store, 5000))
    stream = export.jsonl_lines(rows) if fmt == "jsonl" else _csv_rows(rows, ["a"])
    next(stream)
    rows._conn.execute("SELECT 1")  # open while streaming
    stream.close()
    with pytest.raises(sqlite3.ProgrammingError):
        rows._conn.execute("SELECT 1")
