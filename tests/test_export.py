"""The CSV export: a column per declared param, and every other param in one JSON column,
whatever the items hold and in whatever order they come."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.models import Item, State
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


def test_params_of_a_kwargs_task_are_all_kept(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(tasks={**SAMPLE_TASKS, "echo": "bulkrunner.builtin:echo"}
                         ).test_client()
    rows = export_csv(client, {"task": "echo", "params": {"z": 0},
                               "items": [{"a": 1}, {"b": 2}, {"a": "x", "c": [1]}]})
    assert list(rows[0]) == ["index", "state", "attempts", "params", "result", "error"]
    assert [json.loads(r["params"]) for r in rows] == [
        {"z": 0, "a": 1}, {"z": 0, "b": 2}, {"z": 0, "a": "x", "c": [1]}]


def test_declared_params_get_columns(app_factory: Callable[..., Flask]) -> None:
    client = app_factory().test_client()
    rows = export_csv(client, {"task": "add", "params": {"b": 10},
                               "items": [{"a": 1}, {"a": 2, "b": 5}]})
    assert list(rows[0]) == ["index", "state", "attempts", "a", "b", "params", "result",
                             "error"]
    assert [(r["a"], r["b"], r["params"], r["result"]) for r in rows] == [
        ("1", "10", "", "11"), ("2", "5", "", "7")]


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
    assert "".join(_csv_rows(iter([]), ["a"])) == "index,state,attempts,a,params,result,error\n"
