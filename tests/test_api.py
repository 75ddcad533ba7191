"""The HTTP API through the Flask test client.

Every route, every status code and the error body ``{"error": {"code", "message",
"details"}}`` of each error case. The app runs its real dispatcher on the thread executor
over a temp database (the ``app_factory`` fixture), so jobs really run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import assert_error, wait_for

JOBS = "/api/v1/jobs"
FINISHED = ("succeeded", "failed", "cancelled")
JOB_KEYS = {"id", "task", "params", "state", "priority", "created_at", "started_at",
            "finished_at", "items", "progress", "message", "result", "error"}
COUNT_KEYS = {"total", "queued", "running", "succeeded", "failed", "cancelled"}
ITEM_KEYS = {"index", "params", "state", "attempts", "result", "error", "started_at",
             "finished_at"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def app(app_factory: Callable[..., Flask]) -> Flask:
    return app_factory()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def submit(client: FlaskClient, task: str, params: dict[str, Any] | None = None,
           **body: Any) -> dict[str, Any]:
    """Submit and return the job, asserting the 202."""
    r = client.post(JOBS, json={"task": task, "params": params or {}, **body})
    assert r.status_code == 202, r.get_data(as_text=True)
    job: dict[str, Any] = r.get_json()
    return job


def get_job(client: FlaskClient, ident: str) -> dict[str, Any]:
    r = client.get(f"{JOBS}/{ident}")
    assert r.status_code == 200, r.get_data(as_text=True)
    job: dict[str, Any] = r.get_json()
    return job


def wait_finished(client: FlaskClient, ident: str, timeout: float = 20) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = get_job(client, ident)
        return job if job["state"] in FINISHED else None
    job: dict[str, Any] = wait_for(done, timeout, f"job {ident} did not finish")
    return job


def wait_state(client: FlaskClient, ident: str, *states: str,
               timeout: float = 20) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = get_job(client, ident)
        return job if job["state"] in states else None
    job: dict[str, Any] = wait_for(reached, timeout, f"job {ident} never became {states}")
    return job


def job_count(client: FlaskClient) -> int:
    r = client.get(f"{JOBS}?limit=1000")
    assert r.status_code == 200
    return len(r.get_json()["jobs"])


def multipart(client: FlaskClient, data: bytes, filename: str, **fields: str) -> TestResponse:
    form: dict[str, Any] = {"items": (io.BytesIO(data), filename), **fields}
    return client.post(JOBS, data=form, content_type="multipart/form-data")


# --------------------------------------------------------------------------- submit and get
def test_submit_answers_202_with_location_and_the_job(client: FlaskClient) -> None:
    r = client.post(JOBS, json={"task": "add", "params": {"a": 2, "b": 3}, "priority": 4})
    assert r.status_code == 202, r.get_data(as_text=True)
    job = r.get_json()
    assert set(job) >= JOB_KEYS, set(job) ^ JOB_KEYS
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert re.fullmatch(r"[0-9a-f]{32}", job["id"])
    assert job["task"] == "add" and job["params"] == {"a": 2, "b": 3}
    assert job["priority"] == 4
    assert job["state"] in ("queued", "running", "succeeded")
    assert set(job["items"]) == COUNT_KEYS and job["items"]["total"] == 1
    assert ISO.match(job["created_at"]), job["created_at"]
    assert isinstance(job["progress"], (int, float))
    # The Location header leads to the job.
    assert client.get(r.headers["Location"]).get_json()["id"] == job["id"]


def test_job_runs_to_succeeded_with_its_result(client: FlaskClient) -> None:
    job = submit(client, "add", {"a": 2, "b": 3})
    done = wait_finished(client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["result"] == 5 and done["error"] is None
    assert done["progress"] == 1
    assert done["items"] == {"total": 1, "queued": 0, "running": 0, "succeeded": 1,
                             "failed": 0, "cancelled": 0}
    assert ISO.match(done["started_at"]) and ISO.match(done["finished_at"])
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]


def test_failed_single_item_job_shows_the_error(client: FlaskClient) -> None:
    job = submit(client, "square", {"x": -3})
    done = wait_finished(client, job["id"])
    assert done["state"] == "failed" and done["result"] is None
    err = done["error"]
    assert err["type"] == "ValueError" and "negative: -3" in err["message"]
    assert "Traceback" in err["traceback"] and "square" in err["traceback"]


def test_get_by_unique_prefix(client: FlaskClient) -> None:
    job = submit(client, "noop")
    for n in (6, 12, 31):
        assert get_job(client, job["id"][:n])["id"] == job["id"]
    assert get_job(client, job["id"].upper())["id"] == job["id"]


@pytest.mark.parametrize("ident", [
    "0" * 32, "zzz", "..%2Fx", "a" * 500, "%00", "%ff", "x" * 5000, "-1", "%20",
])
def test_unknown_or_odd_id_is_404(client: FlaskClient, ident: str) -> None:
    submit(client, "noop")  # so that the store is not empty
    err = assert_error(client.get(f"{JOBS}/{ident}"), 404, "not_found")
    assert len(err["message"]) < 300  # a very long id is not echoed back whole
    for action in ("cancel", "retry"):
        assert_error(client.post(f"{JOBS}/{ident}/{action}"), 404, "not_found")
    assert_error(client.get(f"{JOBS}/{ident}/items"), 404, "not_found")
    assert_error(client.get(f"{JOBS}/{ident}/results"), 404, "not_found")


def test_ambiguous_prefix_is_409(client: FlaskClient) -> None:
    by_first: dict[str, list[str]] = {}
    for _ in range(17):  # 16 hex digits: by the 17th job two must share a first character
        job = submit(client, "noop")
        by_first.setdefault(job["id"][0], []).append(job["id"])
        if len(by_first[job["id"][0]]) == 2:
            break
    prefix, ids = next((k, v) for k, v in by_first.items() if len(v) == 2)
    err = assert_error(client.get(f"{JOBS}/{prefix}"), 409, "ambiguous_id")
    assert "prefix" in err["message"]
    assert set(ids) <= set(err["details"]["matches"])
    assert_error(client.post(f"{JOBS}/{prefix}/cancel"), 409, "ambiguous_id")


# --------------------------------------------------------------------------- list
def test_list_is_newest_first_with_filters(client: FlaskClient) -> None:
    adds = [submit(client, "add", {"a": i})["id"] for i in range(4)]
    squares = [submit(client, "square", {"x": -1})["id"] for _ in range(2)]
    for ident in adds + squares:
        wait_finished(client, ident)
    r = client.get(JOBS)
    assert r.status_code == 200
    page = r.get_json()
    assert set(page) == {"jobs", "next"} and page["next"] is None
    assert [j["id"] for j in page["jobs"]] == list(reversed(adds + squares))
    assert set(page["jobs"][0]) >= JOB_KEYS

    by_task = client.get(f"{JOBS}?task=square").get_json()
    assert [j["id"] for j in by_task["jobs"]] == list(reversed(squares))
    by_state = client.get(f"{JOBS}?state=succeeded").get_json()
    assert [j["id"] for j in by_state["jobs"]] == list(reversed(adds))
    both = client.get(f"{JOBS}?state=failed&task=add").get_json()
    assert both == {"jobs": [], "next": None}
    assert client.get(f"{JOBS}?task=nosuchtask").get_json()["jobs"] == []


def test_list_cursor_paging(client: FlaskClient) -> None:
    ids = [submit(client, "noop")["id"] for _ in range(7)]
    seen: list[str] = []
    url = f"{JOBS}?limit=3"
    pages = 0
    while True:
        page = client.get(url).get_json()
        pages += 1
        assert len(page["jobs"]) <= 3
        seen += [j["id"] for j in page["jobs"]]
        if page["next"] is None:
            break
        assert isinstance(page["next"], str)
        url = f"{JOBS}?limit=3&before={page['next']}"
        assert pages < 10, "paging does not end"
    assert pages == 3
    assert seen == list(reversed(ids))


@pytest.mark.parametrize("query", [
    "limit=abc", "limit=0", "limit=-1", "limit=100000", "limit=1.5", "before=abc",
    "before=-5", "state=bogus", "state=QUEUED%20",
])
def test_list_bad_query_is_400(client: FlaskClient, query: str) -> None:
    err = assert_error(client.get(f"{JOBS}?{query}"), 400, "invalid_request")
    assert err["details"]["field"] == query.partition("=")[0]


# --------------------------------------------------------------------------- cancel and retry
def test_cancel_then_cancel_again(client: FlaskClient) -> None:
    job = submit(client, "slow", {"seconds": 30})
    wait_state(client, job["id"], "running")
    r = client.post(f"{JOBS}/{job['id']}/cancel")
    assert r.status_code == 200, r.get_data(as_text=True)
    cancelled = r.get_json()
    assert cancelled["id"] == job["id"] and cancelled["state"] == "cancelled"
    assert cancelled["items"]["cancelled"] == 1
    err = assert_error(client.post(f"{JOBS}/{job['id']}/cancel"), 409, "job_finished")
    assert "cancelled" in err["message"]
    assert get_job(client, job["id"])["state"] == "cancelled"


def test_cancel_of_queued_bulk_and_of_a_succeeded_job(client: FlaskClient) -> None:
    blocker = submit(client, "slow", {"seconds": 30}, items=[{}, {}])  # fills both workers
    # Both blockers must hold their workers first: with fair share the bulk, never served,
    # would take the second worker before the blocker's second item.
    wait_for(lambda: get_job(client, blocker["id"])["items"]["running"] == 2, 20,
             "the blocker's two items never both ran")
    bulk = submit(client, "noop", items=[{} for _ in range(50)])
    cancelled = client.post(f"{JOBS}/{bulk['id']}/cancel").get_json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["items"]["cancelled"] == 50 and cancelled["items"]["succeeded"] == 0
    client.post(f"{JOBS}/{blocker['id']}/cancel")
    done = submit(client, "noop")
    wait_state(client, done["id"], "succeeded")
    assert_error(client.post(f"{JOBS}/{done['id']}/cancel"), 409, "job_finished")


def test_retry_with_nothing_to_retry_is_409(client: FlaskClient) -> None:
    job = submit(client, "noop")
    wait_state(client, job["id"], "succeeded")
    err = assert_error(client.post(f"{JOBS}/{job['id']}/retry"), 409, "nothing_to_retry")
    assert "retry" in err["message"]


def test_retry_reruns_only_failed_items_and_the_job_succeeds(client: FlaskClient,
                                                             tmp_path: Path) -> None:
    # Items 1 and 3 fail once (one attempt each), then succeed when retried.
    counters = [tmp_path / f"count{i}" for i in range(4)]
    items = [{"path": str(p), "fail_times": 1 if i in (1, 3) else 0}
             for i, p in enumerate(counters)]
    job = submit(client, "flaky", items=items, max_attempts=1)
    first = wait_finished(client, job["id"])
    assert first["state"] == "failed"
    assert first["items"] == {"total": 4, "queued": 0, "running": 0, "succeeded": 2,
                              "failed": 2, "cancelled": 0}
    r = client.post(f"{JOBS}/{job['id']}/retry")
    assert r.status_code == 200, r.get_data(as_text=True)
    retried = r.get_json()
    assert retried["items"]["succeeded"] == 2 and retried["items"]["failed"] == 0
    assert retried["state"] in ("queued", "running", "succeeded")
    second = wait_finished(client, job["id"])
    assert second["state"] == "succeeded", second
    assert second["items"]["succeeded"] == 4
    # The succeeded items ran once; the failed ones twice.
    assert [int(p.read_text()) for p in counters] == [1, 2, 1, 2]
    items_out = client.get(f"{JOBS}/{job['id']}/items").get_json()["items"]
    assert [i["result"] for i in items_out] == [1, 2, 1, 2]
    err = assert_error(client.post(f"{JOBS}/{job['id']}/retry"), 409, "nothing_to_retry")
    assert err["details"] == {} or isinstance(err["details"], dict)


def test_retry_of_a_cancelled_job(client: FlaskClient, tmp_path: Path) -> None:
    blocker = submit(client, "slow", {"seconds": 30}, items=[{}, {}])
    # Both workers busy first: a job submitted while one is free would run at once (the
    # task holding fewer workers goes first) and have nothing left to cancel.
    wait_for(lambda: client.get(f"{JOBS}/{blocker['id']}").get_json()["items"]["running"]
             == 2, 20, "the blocker did not take both workers")
    job = submit(client, "add", items=[{"a": i} for i in range(3)])
    client.post(f"{JOBS}/{job['id']}/cancel")
    client.post(f"{JOBS}/{blocker['id']}/cancel")
    retried = client.post(f"{JOBS}/{job['id']}/retry")
    assert retried.status_code == 200
    done = wait_finished(client, job["id"])
    assert done["state"] == "succeeded" and done["items"]["succeeded"] == 3


def test_priority_runs_first(app_factory: Callable[..., Flask], tmp_path: Path) -> None:
    client = app_factory(max_workers=1).test_client()
    log = tmp_path / "order.txt"
    blocker = submit(client, "slow", {"seconds": 30})
    wait_state(client, blocker["id"], "running")
    low = submit(client, "record", {"path": str(log)}, items=[{"i": 1}, {"i": 2}])
    high = submit(client, "record", {"path": str(log), "i": 9}, priority=5)
    client.post(f"{JOBS}/{blocker['id']}/cancel")
    wait_state(client, low["id"], "succeeded")
    wait_state(client, high["id"], "succeeded")
    assert log.read_text().split() == ["9", "1", "2"]


# --------------------------------------------------------------------------- idempotency
def test_idempotency_key(client: FlaskClient) -> None:
    body = {"task": "add", "params": {"a": 1}, "key": "order-42"}
    first = client.post(JOBS, json=body)
    assert first.status_code == 202
    replay = client.post(JOBS, json=body)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    assert replay.get_json()["id"] == first.get_json()["id"]
    assert replay.headers["Location"] == first.headers["Location"]
    err = assert_error(client.post(JOBS, json={**body, "params": {"a": 2}}), 409,
                       "key_conflict")
    assert "order-42" in err["message"]
    assert job_count(client) == 1


def test_idempotency_key_under_concurrent_submissions(app: Flask) -> None:
    body = {"task": "add", "params": {"a": 1}, "items": [{"b": i} for i in range(50)],
            "key": "race"}

    def post(_: int) -> tuple[int, str]:
        r = app.test_client().post(JOBS, json=body)
        return r.status_code, r.get_json()["id"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert sorted(code for code, _ in answers) == [200] * 7 + [202], answers
    assert len({ident for _, ident in answers}) == 1
    assert job_count(app.test_client()) == 1


# --------------------------------------------------------------------------- 422
@pytest.mark.parametrize(("body", "fields"), [
    ({"task": "nosuch"}, {"task"}),
    ({"task": 5}, {"task"}),
    ({"task": "add", "params": {"a": 1, "zz": 2}}, {"params.zz"}),
    ({"task": "add", "params": {}}, {"params.a"}),
    ({"task": "add", "params": {"a": "one"}}, {"params.a"}),
    ({"task": "add", "params": {"a": 1.5}}, {"params.a"}),
    ({"task": "add", "params": {"a": True}}, {"params.a"}),
    ({"task": "add", "params": {"a": None}}, {"params.a"}),
    ({"task": "typed", "params": {"n": "1", "ratio": "x", "flag": 1, "mode": "medium",
                                  "color": "blue", "tags": [1]}},
     {"params.n", "params.ratio", "params.flag", "params.mode", "params.color",
      "params.tags"}),
    ({"task": "typed", "params": {"n": 1, "ratio": 1.0}}, {"params.flag"}),
    ({"task": "add", "params": [1]}, {"params"}),
    ({"task": "add", "params": {"a": 1}, "priority": "high"}, {"priority"}),
    ({"task": "add", "params": {"a": 1}, "priority": 1.5}, {"priority"}),
    ({"task": "add", "params": {"a": 1}, "max_attempts": 0}, {"max_attempts"}),
    ({"task": "add", "params": {"a": 1}, "max_attempts": "3"}, {"max_attempts"}),
    ({"task": "add", "params": {"a": 1}, "timeout": "soon"}, {"timeout"}),
    ({"task": "add", "params": {"a": 1}, "timeout": -1}, {"timeout"}),
    ({"task": "add", "params": {"a": 1}, "key": 7}, {"key"}),
    ({"task": "add", "params": {"a": 1}, "priority": "x", "max_attempts": [],
      "timeout": {}}, {"priority", "max_attempts", "timeout"}),
    ({"task": "add", "params": {"a": 1}, "colour": "red"}, {"colour"}),
    ({"task": "add", "items": [{"a": 1}, {"a": "x"}, 5, {}]},
     {"items[1].a", "items[2]", "items[3].a"}),
    ({"task": "add", "items": []}, {"items"}),
    ({"task": "add", "items": {"a": 1}}, {"items"}),
    ([1, 2], {"body"}),
    ("add", {"body"}),
])
def test_invalid_submission_is_422_naming_each_field(client: FlaskClient, body: Any,
                                                     fields: set[str]) -> None:
    err = assert_error(client.post(JOBS, json=body), 422, "invalid_submission")
    assert set(err["details"]["fields"]) == fields, err
    for name in fields:
        assert name in err["message"] or len(fields) > 5, err["message"]
    assert job_count(client) == 0


def test_unknown_task_message_lists_the_known_tasks(client: FlaskClient) -> None:
    err = assert_error(client.post(JOBS, json={"task": "nosuch"}), 422)
    assert "nosuch" in err["message"] and "add" in err["message"]


# --------------------------------------------------------------------------- 400, 413, 415
@pytest.mark.parametrize("data", [
    b'{"task": "add"',
    b"",
    b"{'task': 'add'}",
    b'{"task": "\xff\xfe"}',
    b"\xff\xfe{}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"task": "echo", "params": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    b'{"task": "add", "params": {"a": ' + b"9" * 5000 + b"}}",
])
def test_unparseable_body_is_400(client: FlaskClient, data: bytes) -> None:
    r = client.post(JOBS, data=data, content_type="application/json")
    err = assert_error(r, 400, "invalid_request")
    assert "JSON" in err["message"]
    assert job_count(client) == 0


@pytest.mark.parametrize(("data", "field"), [
    (b'{"task": "typed", "params": {"n": 1, "ratio": NaN, "flag": true}}', "params.ratio"),
    (b'{"task": "typed", "params": {"n": 1, "ratio": 1e999, "flag": true}}', "params.ratio"),
    (b'{"task": "typed", "params": {"n": 1, "ratio": -Infinity, "flag": true}}',
     "params.ratio"),
    (b'{"task": "echo", "params": {"x": [1, NaN]}}', "params"),
    (b'{"task": "echo", "params": {"x": NaN}}', "params"),
    (b'{"task": "typed", "params": {"n": 1, "flag": true}, "items": [{"ratio": 1}, '
     b'{"ratio": Infinity}]}', "items[1].ratio"),
    (b'{"task": "echo", "items": [{"x": 1}, {"x": {"y": NaN}}]}', "items[1]"),
    (b'{"task": "add", "params": {"a": 1}, "timeout": Infinity}', "timeout"),
])
def test_non_finite_numbers_are_422(client: FlaskClient, data: bytes, field: str) -> None:
    # Python's json module reads NaN and Infinity, but they cannot be sent back as JSON:
    # a job holding one would make every answer about it invalid JSON.
    r = client.post(JOBS, data=data, content_type="application/json")
    err = assert_error(r, 422, "invalid_submission")
    assert field in err["details"]["fields"], err
    assert job_count(client) == 0


@pytest.mark.parametrize("ctype", [
    "text/plain", "application/x-www-form-urlencoded", "application/xml", None,
])
def test_unsupported_content_type_is_415(client: FlaskClient, ctype: str | None) -> None:
    data = '{"task": "add", "params": {"a": 1}}'
    r = client.post(JOBS, data=data, content_type=ctype) if ctype else \
        client.post(JOBS, data=data)
    err = assert_error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    assert job_count(client) == 0


def test_body_over_max_body_size_is_413(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(server="max_body_size = 2048").test_client()
    big = {"task": "echo", "params": {"x": "y" * 4000}}
    err = assert_error(client.post(JOBS, json=big), 413, "body_too_large")
    assert "2048" in err["message"]
    csv_data = b"a\n" + b"1\n" * 3000
    assert_error(multipart(client, csv_data, "big.csv", task="add"), 413, "body_too_large")
    small = client.post(JOBS, json={"task": "echo", "params": {"x": "y" * 100}})
    assert small.status_code == 202
    assert job_count(client) == 1


# --------------------------------------------------------------------------- 404 / 405 routes
@pytest.mark.parametrize(("method", "path"), [
    ("delete", JOBS), ("put", JOBS), ("get", f"{JOBS}/abc/cancel"),
    ("get", f"{JOBS}/abc/retry"), ("post", f"{JOBS}/abc"), ("delete", f"{JOBS}/abc"),
    ("post", "/api/v1/tasks"), ("post", "/healthz"), ("post", f"{JOBS}/abc/items"),
    ("post", f"{JOBS}/abc/results"), ("post", "/openapi.json"),
])
def test_wrong_method_is_405(client: FlaskClient, method: str, path: str) -> None:
    r = getattr(client, method)(path)
    err = assert_error(r, 405, "method_not_allowed")
    assert method.upper() in err["message"]
    assert r.headers.get("Allow"), "405 should say which methods are allowed"


@pytest.mark.parametrize("path", ["/nope", "/api/v1/nope", "/api/v2/jobs", f"{JOBS}/a/b/c",
                                  "/api/v1/jobs/abc/frobnicate"])
def test_unknown_route_is_404_with_the_error_shape(client: FlaskClient, path: str) -> None:
    assert_error(client.get(path), 404, "not_found")


# --------------------------------------------------------------------------- 503, 401
def test_queue_full_is_503_with_retry_after(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(jobs="max_queued = 3").test_client()
    r = client.post(JOBS, json={"task": "noop", "items": [{} for _ in range(4)]})
    err = assert_error(r, 503, "queue_full")
    assert int(r.headers["Retry-After"]) > 0
    assert err["details"]["limit"] == 3
    assert job_count(client) == 0


def test_shutting_down_is_503(app: Flask, client: FlaskClient) -> None:
    app.extensions["bulkrunner"].begin_drain()
    r = client.post(JOBS, json={"task": "noop"})
    assert_error(r, 503, "shutting_down")
    assert int(r.headers["Retry-After"]) > 0
    health = client.get("/healthz")
    assert health.status_code == 503 and health.headers.get("Retry-After")
    assert health.get_json()["status"] == "draining"


def test_token_is_required_when_configured(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(server='token = "s3cret"').test_client()
    assert_error(client.get(JOBS), 401, "unauthorized")
    assert_error(client.get(JOBS, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(client.post(JOBS, json={"task": "noop"}), 401)
    assert client.get("/healthz").status_code == 200
    ok = client.get(JOBS, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


# --------------------------------------------------------------------------- items
@pytest.fixture
def square_bulk(client: FlaskClient) -> dict[str, Any]:
    """A finished bulk of ten squares where items 3 and 7 (negative x) failed."""
    items = [{"x": -i if i in (3, 7) else i} for i in range(10)]
    job = submit(client, "square", items=items)
    return wait_finished(client, job["id"])


def test_bulk_with_failing_items_ends_failed_with_true_counts(
        square_bulk: dict[str, Any]) -> None:
    assert square_bulk["state"] == "failed"
    assert square_bulk["items"] == {"total": 10, "queued": 0, "running": 0, "succeeded": 8,
                                    "failed": 2, "cancelled": 0}
    assert square_bulk["progress"] == 1
    assert square_bulk["result"] is None  # only a one-item job carries a result


def test_items_paging_and_state_filter(client: FlaskClient,
                                       square_bulk: dict[str, Any]) -> None:
    ident = square_bulk["id"]
    seen: list[dict[str, Any]] = []
    url = f"{JOBS}/{ident}/items?limit=4"
    for _ in range(10):
        r = client.get(url)
        assert r.status_code == 200
        page = r.get_json()
        assert set(page) == {"items", "next"}
        seen += page["items"]
        if page["next"] is None:
            break
        url = f"{JOBS}/{ident}/items?limit=4&after={page['next']}"
    assert [i["index"] for i in seen] == list(range(10))
    assert all(set(i) >= ITEM_KEYS for i in seen)
    assert seen[2]["params"] == {"x": 2} and seen[2]["result"] == 4
    assert seen[2]["state"] == "succeeded" and seen[2]["attempts"] == 1
    assert ISO.match(seen[2]["started_at"]) and ISO.match(seen[2]["finished_at"])

    failed = client.get(f"{JOBS}/{ident}/items?state=failed").get_json()
    assert [i["index"] for i in failed["items"]] == [3, 7]
    assert failed["next"] is None
    assert failed["items"][0]["error"]["type"] == "ValueError"
    assert failed["items"][0]["result"] is None
    ok = client.get(f"{JOBS}/{ident}/items?state=succeeded&limit=100").get_json()
    assert len(ok["items"]) == 8
    # By prefix too.
    assert len(client.get(f"{JOBS}/{ident[:8]}/items").get_json()["items"]) == 10


@pytest.mark.parametrize("query", ["limit=0", "limit=x", "limit=20000", "after=x",
                                   "state=done"])
def test_items_bad_query_is_400(client: FlaskClient, query: str) -> None:
    job = submit(client, "noop")
    err = assert_error(client.get(f"{JOBS}/{job['id']}/items?{query}"), 400,
                       "invalid_request")
    assert err["details"]["field"] == query.partition("=")[0]


# --------------------------------------------------------------------------- results
def test_results_jsonl(client: FlaskClient, square_bulk: dict[str, Any]) -> None:
    r = client.get(f"{JOBS}/{square_bulk['id']}/results?format=jsonl")
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    assert square_bulk["id"] in r.headers["Content-Disposition"]
    rows = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    assert len(rows) == 10
    assert [row["index"] for row in rows] == list(range(10))
    assert {"index", "params", "state", "result", "error"} <= set(rows[0])
    for i, row in enumerate(rows):
        if i in (3, 7):
            assert row["state"] == "failed" and row["result"] is None
            assert row["error"]["type"] == "ValueError"
        else:
            assert row == {**row, "params": {"x": i}, "state": "succeeded",
                           "result": i * i, "error": None}
    # jsonl is the default format
    assert client.get(f"{JOBS}/{square_bulk['id']}/results").data == r.data


def test_results_csv(client: FlaskClient, square_bulk: dict[str, Any]) -> None:
    r = client.get(f"{JOBS}/{square_bulk['id']}/results?format=csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert len(rows) == 10
    assert {"index", "state", "x", "result", "error"} <= set(rows[0])
    assert rows[4] == {**rows[4], "index": "4", "state": "succeeded", "x": "4",
                       "result": "16", "error": ""}
    assert rows[3]["state"] == "failed" and rows[3]["result"] == ""
    assert rows[3]["x"] == "-3" and "ValueError" in rows[3]["error"]


def test_results_bad_format_is_400(client: FlaskClient) -> None:
    job = submit(client, "noop")
    err = assert_error(client.get(f"{JOBS}/{job['id']}/results?format=xml"), 400,
                       "invalid_request")
    assert err["details"]["field"] == "format"


# --------------------------------------------------------------------------- uploads
TYPED_CSV = (
    "n,ratio,flag,name,mode,color,tags\n"
    '1,0.5,true,alpha,fast,red,"[""x"", ""y""]"\n'
    "2,2,no,beta,slow,green,\n"
    "3,-1.25,1,,fast,red,[]\n"
)


def test_csv_upload_coerces_by_type_hint(client: FlaskClient) -> None:
    r = multipart(client, TYPED_CSV.encode(), "items.csv", task="typed")
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.headers["Location"].endswith(r.get_json()["id"])
    job = wait_finished(client, r.get_json()["id"])
    assert job["state"] == "succeeded", job
    assert job["items"]["total"] == 3
    items = client.get(f"{JOBS}/{job['id']}/items").get_json()["items"]
    first, second, third = (i["params"] for i in items)
    assert first == {"n": 1, "ratio": 0.5, "flag": True, "name": "alpha", "mode": "fast",
                     "color": "red", "tags": ["x", "y"]}
    assert type(first["n"]) is int and type(first["ratio"]) is float
    assert second["flag"] is False and second["ratio"] == 2.0 and "tags" not in second
    assert third["flag"] is True and third["name"] == "" and third["tags"] == []
    assert items[1]["result"]["mode"] == "slow" and items[1]["result"]["color"] == "green"


@pytest.mark.parametrize(("data", "row", "field"), [
    ("n,ratio,flag\n1,0.5,true\n2,zero,false\n", 3, "row 3 (item 1), ratio"),
    ("n,ratio,flag\n1,0.5,true\n2,0.5,true\n3.5,1,true\n", 4, "row 4 (item 2), n"),
    ("n,ratio,flag\n1,0.5,maybe\n", 2, "row 2 (item 0), flag"),
    ("n,ratio,flag,mode\n1,0.5,true,medium\n", 2, "row 2 (item 0), mode"),
    ("n,ratio,flag\n1,0.5,true\n2,0.5\n", 3, "row 3 (item 1)"),
    ("n,ratio,flag,bogus\n1,0.5,true,x\n", 1, "row 1, bogus"),
    ("n,ratio\n1,0.5\n", 2, "row 2 (item 0), flag"),
])
def test_csv_bad_row_is_422_naming_row_and_field(client: FlaskClient, data: str, row: int,
                                                 field: str) -> None:
    submit(client, "noop")
    before = job_count(client)
    err = assert_error(multipart(client, data.encode(), "items.csv", task="typed"), 422,
                       "invalid_submission")
    assert field in err["details"]["fields"], err
    assert err["details"]["row"] == row
    assert f"row {row}" in err["message"]
    assert job_count(client) == before


def test_jsonl_upload_with_job_params(client: FlaskClient) -> None:
    data = b'{"a": 1}\n\n{"a": 2, "b": 100}\n{"a": 3}\n'
    r = multipart(client, data, "items.jsonl", task="add", params='{"b": 10}')
    assert r.status_code == 202, r.get_data(as_text=True)
    job = wait_finished(client, r.get_json()["id"])
    assert job["state"] == "succeeded" and job["params"] == {"b": 10}
    items = client.get(f"{JOBS}/{job['id']}/items").get_json()["items"]
    assert [i["result"] for i in items] == [11, 102, 13]  # an item's own values win


@pytest.mark.parametrize(("data", "field"), [
    (b'{"a": 1}\n{"a": \n', "line 2 (item 1)"),
    (b'{"a": 1}\n[1, 2]\n', "line 2 (item 1)"),
    (b'{"a": 1}\n{"a": "x"}\n', "line 2 (item 1), a"),
])
def test_jsonl_bad_row_is_422(client: FlaskClient, data: bytes, field: str) -> None:
    err = assert_error(multipart(client, data, "items.jsonl", task="add"), 422,
                       "invalid_submission")
    assert field in err["details"]["fields"], err
    assert err["details"]["row"] == 2
    assert job_count(client) == 0


@pytest.mark.parametrize(("fields", "files", "bad"), [
    ({"task": "add"}, None, "items"),
    ({"task": "nosuch"}, (b"a\n1\n", "i.csv"), "task"),
    ({"task": "add", "params": "{not json"}, (b"a\n1\n", "i.csv"), "params"),
    ({"task": "add", "priority": "high"}, (b"a\n1\n", "i.csv"), "priority"),
    ({"task": "add", "colour": "red"}, (b"a\n1\n", "i.csv"), "colour"),
    ({"task": "add"}, (b"a\n", "i.csv"), "items"),
    ({"task": "add"}, (b"", "i.csv"), "items"),
    ({"task": "add"}, (b"a\n\xff\n", "i.csv"), "items"),
])
def test_bad_multipart_submission_is_422(client: FlaskClient, fields: dict[str, str],
                                         files: tuple[bytes, str] | None, bad: str) -> None:
    form: dict[str, Any] = dict(fields)
    if files is not None:
        form["items"] = (io.BytesIO(files[0]), files[1])
    r = client.post(JOBS, data=form, content_type="multipart/form-data")
    err = assert_error(r, 422, "invalid_submission")
    assert bad in err["details"]["fields"], err
    assert job_count(client) == 0


def test_thousand_item_csv_bulk(client: FlaskClient) -> None:
    data = ("a\n" + "".join(f"{i}\n" for i in range(1000))).encode()
    r = multipart(client, data, "thousand.csv", task="add", params='{"b": 1000}')
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.get_json()["items"]["total"] == 1000
    job = wait_finished(client, r.get_json()["id"], timeout=40)
    assert job["state"] == "succeeded", job
    assert job["items"]["succeeded"] == 1000 and job["progress"] == 1
    out = client.get(f"{JOBS}/{job['id']}/results?format=csv")
    rows = list(csv.DictReader(io.StringIO(out.get_data(as_text=True))))
    assert len(rows) == 1000
    assert [int(row["index"]) for row in rows] == list(range(1000))
    assert all(int(row["result"]) == int(row["a"]) + 1000 for row in rows)
    assert all(row["state"] == "succeeded" for row in rows)


def test_progress_rises_monotonically(client: FlaskClient) -> None:
    # Six items of 0.5 s on two workers: long enough for the 0.5 s progress flushes.
    job = submit(client, "progress", {"steps": 5, "delay": 0.1}, items=[{} for _ in range(6)])
    samples: list[float] = []
    messages: set[str] = set()

    def sample() -> bool:
        j = get_job(client, job["id"])
        samples.append(j["progress"])
        if j["message"]:
            messages.add(j["message"])
        return j["state"] in FINISHED

    wait_for(sample, 30, "the progress job did not finish", interval=0.02)
    assert samples[-1] == 1
    assert all(a <= b for a, b in itertools.pairwise(samples)), samples
    assert len(set(samples)) >= 4, samples  # it rose in steps, not straight to 1
    assert any(m.startswith("step ") for m in messages), messages


# --------------------------------------------------------------------------- tasks, health
def test_tasks_listing(client: FlaskClient) -> None:
    r = client.get("/api/v1/tasks")
    assert r.status_code == 200
    body = r.get_json()
    tasks = {t["name"]: t for t in body["tasks"]}
    assert {"add", "typed", "square", "echo"} <= set(tasks)
    for t in body["tasks"]:
        assert {"name", "doc", "params"} <= set(t)
        for p in t["params"]:
            assert {"name", "type", "required", "default"} <= set(p)
    assert tasks["add"]["doc"].startswith("Add two integers")
    assert tasks["add"]["params"] == [
        {"name": "a", "type": "int", "required": True, "default": None},
        {"name": "b", "type": "int", "required": False, "default": 1}]
    typed = {p["name"]: p for p in tasks["typed"]["params"]}
    assert typed["ratio"]["type"] == "float" and typed["flag"]["type"] == "bool"
    assert typed["mode"]["choices"] == ["fast", "slow"]
    assert typed["color"]["default"] == "red"


def test_healthz(client: FlaskClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.get_json()["status"] == "ok"


# --------------------------------------------------------------------------- OpenAPI
def _app_routes(app: Flask) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):
            continue
        path = re.sub(r"<(?:[a-z]+:)?(\w+)>",
                      lambda m: "{id}" if m[1] == "ident" else f"{{{m[1]}}}", rule.rule)
        assert "<" not in path, f"unexpected converter in {rule.rule}"
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                out.add((path, method.lower()))
    return out


def test_openapi_is_valid_and_documents_exactly_the_routes(app: Flask,
                                                           client: FlaskClient) -> None:
    from openapi_spec_validator import validate

    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    doc = r.get_json()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops
                  if method in ("get", "post", "put", "patch", "delete")}
    assert documented == _app_routes(app)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("operationId"), (path, method)
            assert "200" in op["responses"] or "202" in op["responses"], (path, method)
