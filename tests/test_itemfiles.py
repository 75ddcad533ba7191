"""Uploaded items files: CSV, TSV, JSON Lines and JSON arrays, read by the parser directly
and uploaded through the API."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.errors import InvalidSubmission
from bulkrunner.server.itemfiles import detect_format, parse_items
from bulkrunner.server.tasks import Task, task_from_function
from tests import sample_tasks
from tests.conftest import JOBS, wait_app_job

TYPED = task_from_function("typed", "tests.sample_tasks:typed", sample_tasks.typed)
ADD = task_from_function("add", "tests.sample_tasks:add", sample_tasks.add)


def parse(data: str, filename: str, task: Task = TYPED) -> Any:
    return parse_items(data.encode(), detect_format(filename, None, data.encode()), task)


# --------------------------------------------------------------------------- the parser
@pytest.mark.parametrize(("filename", "content_type", "data", "fmt"), [
    ("a.csv", None, b"", "csv"), ("a.TSV", None, b"", "tsv"), ("a.jsonl", None, b"", "jsonl"),
    ("a.ndjson", None, b"", "jsonl"), ("a.json", None, b"", "json"),
    (None, "text/tab-separated-values", b"", "tsv"), (None, "text/csv", b"", "csv"),
    (None, "application/x-ndjson", b"", "jsonl"), (None, "application/json", b"", "json"),
    (None, None, b' [{"a": 1}]', "json"), (None, None, b'{"a": 1}', "jsonl"),
    (None, None, b"a\n1\n", "csv"),
])
def test_detect_format(filename: str | None, content_type: str | None, data: bytes,
                       fmt: str) -> None:
    assert detect_format(filename, content_type, data) == fmt


def test_an_empty_choice_cell_is_not_given() -> None:
    # mode is a Literal and color an Enum, neither with "" among its choices: an empty cell
    # leaves them to their defaults, as for numbers; a plain str cell keeps "".
    parsed = parse("n,ratio,flag,name,mode,color\n1,0.5,true,,,\n2,1,false,b,slow,green\n",
                   "x.csv")
    assert parsed.items == [{"n": 1, "ratio": 0.5, "flag": True, "name": ""},
                            {"n": 2, "ratio": 1.0, "flag": False, "name": "b", "mode": "slow",
                             "color": "green"}]


def test_tsv_is_split_on_tabs() -> None:
    # Commas inside cells are text in a TSV file, not separators.
    parsed = parse("n\tratio\tflag\tname\n1\t0.5\ttrue\ta, b\n2\t2\tfalse\tc\n", "x.tsv")
    assert parsed.items == [{"n": 1, "ratio": 0.5, "flag": True, "name": "a, b"},
                            {"n": 2, "ratio": 2.0, "flag": False, "name": "c"}]
    assert parsed.rows == [2, 3] and parsed.unit == "row"


def test_a_bad_tsv_row_is_named() -> None:
    with pytest.raises(InvalidSubmission) as e:
        parse("n\tratio\tflag\n1\t0.5\ttrue\n2\tzero\tfalse\n", "x.tsv")
    assert "row 3 (item 1), ratio" in e.value.fields and e.value.details["row"] == 3
    assert e.value.details["index"] == 1


def test_a_json_array_of_objects() -> None:
    parsed = parse('[{"a": 1}, {"a": 2, "b": 5}]', "x.json", ADD)
    assert parsed.items == [{"a": 1}, {"a": 2, "b": 5}]
    assert parsed.rows == [1, 2] and parsed.unit == "item"


def test_a_json_array_names_the_bad_element_by_its_position() -> None:
    # The third element is item 2: its position from 0, the item index everywhere.
    with pytest.raises(InvalidSubmission) as e:
        parse('[{"a": 1}, {"a": 2},\n 7]', "x.json", ADD)
    assert e.value.fields == {"item 2": "must be a JSON object of param names to values"}
    assert e.value.details["index"] == 2 and "row" not in e.value.details


@pytest.mark.parametrize(("data", "items"), [
    ('{"a": 1}\n{"a": 2}\n', [{"a": 1}, {"a": 2}]),  # JSON Lines saved as .json
    ('{\n  "a": 1\n}\n', [{"a": 1}]),                 # one pretty-printed object
])
def test_a_json_file_may_hold_json_lines_or_one_object(data: str,
                                                       items: list[dict[str, int]]) -> None:
    assert parse(data, "x.json", ADD).items == items


@pytest.mark.parametrize(("data", "words"), [
    ('[{"a": 1},\n {"a": ]', "is not a valid JSON array"),
    ('"text"', "an array of objects"),
])
def test_a_bad_json_file(data: str, words: str) -> None:
    with pytest.raises(InvalidSubmission) as e:
        parse(data, "x.json", ADD)
    assert words in e.value.fields["items"]


def test_json_lines_files_stay_json_lines() -> None:
    with pytest.raises(InvalidSubmission) as e:
        parse('[{"a": 1}]\n', "x.jsonl", ADD)
    assert "line 1 (item 0)" in e.value.fields


# --------------------------------------------------------------------------- the API
@pytest.fixture
def client(app_factory: Callable[..., Flask]) -> FlaskClient:
    return app_factory().test_client()


def upload(client: FlaskClient, data: str, filename: str, **fields: str) -> Any:
    form: dict[str, Any] = {"items": (io.BytesIO(data.encode()), filename), **fields}
    return client.post(JOBS, data=form, content_type="multipart/form-data")


def finished_items(client: FlaskClient, ident: str) -> list[dict[str, Any]]:
    job = wait_app_job(client, ident, 20)
    assert job["state"] == "succeeded", job
    items: list[dict[str, Any]] = client.get(f"{JOBS}/{ident}/items").get_json()["items"]
    return items


def test_upload_tsv(client: FlaskClient) -> None:
    r = upload(client, "a\tb\n1\t2\n3\t4\n", "items.tsv", task="add")
    assert r.status_code == 202, r.get_data(as_text=True)
    assert [i["result"] for i in finished_items(client, r.get_json()["id"])] == [3, 7]


def test_upload_json_array(client: FlaskClient) -> None:
    r = upload(client, '[{"a": 1}, {"a": 2, "b": 10}]', "export.json", task="add")
    assert r.status_code == 202, r.get_data(as_text=True)
    assert [i["result"] for i in finished_items(client, r.get_json()["id"])] == [2, 12]


def test_upload_json_array_with_a_bad_item_is_422_naming_it(client: FlaskClient) -> None:
    r = upload(client, '[{"a": 1}, {"a": 2}, {"a": "x"}]', "export.json", task="add")
    assert r.status_code == 422
    err = r.get_json()["error"]
    assert "item 2, a" in err["details"]["fields"] and err["details"]["index"] == 2
    assert err["message"].startswith("item 2, a: ")
    r = upload(client, "[]", "export.json", task="add")
    assert r.status_code == 422
    assert r.get_json()["error"]["details"]["fields"] == {"items": "the file holds no items"}
