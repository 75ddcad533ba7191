"""A big submission body is read with its items left as text: the same values and the same
errors as ``json.loads``, without every item's object made at once."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from bulkrunner.server import bodies
from bulkrunner.server.bodies import ItemsText, parse_json_body
from bulkrunner.server.submission import _body_hash
from tests.conftest import JOBS, assert_error

PAD = "x" * bodies.STREAM_BODY  # makes any body big enough to be streamed


def read(body: Any) -> Any:
    """``parse_json_body`` with items made plain again, to compare with ``json.loads``."""
    got = parse_json_body(body if isinstance(body, bytes) else body.encode())
    if isinstance(got, dict) and isinstance(got.get("items"), ItemsText):
        got["items"] = list(got["items"])
    return got


@pytest.mark.parametrize("text", [
    '{"task": "t", "items": [{"a": 1}, {"b": [1, {"c": null}]}], "pad": "%s"}',
    ' \n{ "pad" : "%s" , "items" : [ ] , "task":"t" }\t',
    '{"items": [1, "two", [3], {"n": -0.5e3}, true, null, NaN], "pad": "%s"}',
    '{"items": [{"a": 1}], "items": [{"a": 2}, {"a": 3}], "pad": "%s"}',  # the last wins
    '{"items": {"not": "a list"}, "pad": "%s"}',
    '{"pad": "%s", "items": [{"\\u00e9": "\\ud83d\\ude00 \\ud800"}]}',
    '{}',
    '[{"a": 1}, "%s"]',
    '"%s"',
])
def test_a_big_body_reads_as_json_loads_reads_it(text: str) -> None:
    body = text.replace("%s", PAD) if "%s" in text else text + " " * bodies.STREAM_BODY
    assert read(body) == json.loads(body)


@pytest.mark.parametrize("text", [
    '{"items": [{"a": 1},, {"a": 2}], "pad": "%s"}',
    '{"items": [{"a": 1} {"a": 2}], "pad": "%s"}',
    '{"items": [{"a": 1},], "pad": "%s"}',
    '{"items": [{"a": 1}], "pad": "%s"',
    '{"items": [{"a": 1}, "pad": "%s"}',
    '{"items" [], "pad": "%s"}',
    '{items: [], "pad": "%s"}',
    '{"pad": "%s"} trailing',
    '{"pad": "%s",}',
])
def test_a_big_body_that_is_not_json_fails_as_json_loads_fails(text: str) -> None:
    body = text.replace("%s", PAD)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(body)
    with pytest.raises(json.JSONDecodeError) as got:
        read(body)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)


def test_the_items_of_a_big_body_are_never_all_objects_at_once() -> None:
    data = json.dumps({"task": "t", "items": [{"i": i, "s": "abc"} for i in range(100_000)]}
                      ).encode()
    tracemalloc.start()
    try:
        body = parse_json_body(data)
        n = sum(1 for _ in body["items"])
        lazy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = json.loads(data)
        whole_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(body["items"]) == len(whole["items"]) == 100_000
    # The body's text (about 2.8 MB as a str) against some 25 MB of dicts.
    assert lazy_peak < 6_000_000 < 20_000_000 < whole_peak, (lazy_peak, whole_peak)


@pytest.mark.parametrize("items", [None, [], [{"b": 1, "a": [2, {"d": 1, "c": None}]}, {}],
                                   "text"])
def test_the_idempotency_hash_is_the_whole_bodys(items: Any) -> None:
    body = {"task": "t", "key": "k", "params": {"q": 1, "p": [1.5]}, "priority": 2}
    if items == "text":  # the items of a big body, as text
        items = parse_json_body(json.dumps(
            {"items": [{"z": 1}, {"y": "é"}], "pad": PAD}).encode())["items"]
        assert isinstance(items, ItemsText)
    plain = list(items) if items is not None else None
    whole = hashlib.sha256(json.dumps(dict(body, items=plain), sort_keys=True, default=str)
                           .encode()).hexdigest()
    assert _body_hash(body, items) == whole


def test_a_big_body_is_stored_checked_and_replayed_by_its_key(
        app_factory: Callable[..., Flask]) -> None:
    client = app_factory().test_client()
    items = [{"a": i, "b": 1} for i in range(20_000)]
    body = json.dumps({"task": "add", "key": "big", "items": items}).encode()
    assert len(body) > bodies.STREAM_BODY
    first = client.post(JOBS, data=body, content_type="application/json")
    assert first.status_code == 202, first.get_data(as_text=True)
    again = client.post(JOBS, data=body, content_type="application/json")
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    other = json.dumps({"task": "add", "key": "big", "items": items[:-1]}).encode()
    assert client.post(JOBS, data=other, content_type="application/json").status_code == 409
    # A bad item of a big body is named as in a small one.
    bad = json.dumps({"task": "add", "items": [*items[:15_000], {"a": "x"}]}).encode()
    err = assert_error(client.post(JOBS, data=bad, content_type="application/json"), 422,
                       "invalid_submission")
    assert list(err["details"]["fields"]) == ["items[15000].a"], err
    broken = body[:-2] + b",}"
    err = assert_error(client.post(JOBS, data=broken, content_type="application/json"), 400)
    assert "not valid JSON" in err["message"], err
