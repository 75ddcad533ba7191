"""Size and range limits: an attempt's error is capped on the worker and the job list
leaves tracebacks out; item indexes and query numbers out of range are 404 / 400, never
500; a CSV row too large to read is named by its own number; output of threads that run
no item is rate-limited on its way to the server's streams."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.config import config_from_dict, load_config
from bulkrunner.errors import ConfigError, InvalidSubmission
from bulkrunner.runtime import capture
from bulkrunner.runtime.run import ERROR_CUT, cap_error, error_dict, run_item
from bulkrunner.server.itemfiles import parse_items
from bulkrunner.server.tasks import task_from_function
from tests import limit_tasks, sample_tasks
from tests.conftest import JOBS, ROOT, SAMPLE_TASKS, wait_app_job, wait_for, work_unit

LIMIT_TASKS = {**SAMPLE_TASKS, "huge_error": "tests.limit_tasks:huge_error",
               "thread_flood": "tests.limit_tasks:thread_flood"}
MB = 1_000_000
#: The most a cut marker adds: the text of ERROR_CUT with room for large numbers.
MARKER = len(ERROR_CUT) + 40


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _error_size(err: dict[str, Any]) -> int:
    return _bytes(err["message"]) + _bytes(err.get("traceback") or "")


def _raised(size: int, char: str = "x") -> BaseException:
    try:
        limit_tasks.huge_error(size, char)
    except RuntimeError as e:
        return e
    raise AssertionError("huge_error did not raise")


def _keys(value: Any) -> set[str]:
    """Every key of every object in a JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value))
    return set()


# --------------------------------------------------------------------------- config
def test_max_error_size_defaults_to_64_kib_and_is_in_the_example() -> None:
    assert config_from_dict({}).jobs.max_error_size == 65536
    assert load_config(ROOT / "config.example.toml").jobs.max_error_size == 65536
    assert "max_error_size = 65536" in (ROOT / "config.example.toml").read_text()


@pytest.mark.parametrize("value, words", [(100, "must be at least 256 bytes"),
                                          ("64k", "must be a whole number")])
def test_max_error_size_is_validated(tmp_path: Path, value: Any, words: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"[jobs]\nmax_error_size = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == "jobs.max_error_size" and words in e.value.message
    assert "c.toml" in e.value.message


# --------------------------------------------------------------------------- the cap
def test_a_small_error_is_kept_whole() -> None:
    err = error_dict(ValueError("short"))
    assert err["message"] == "short" and "ValueError: short" in err["traceback"]
    assert "bulkrunner: cut" not in err["message"] + err["traceback"]
    small = {"type": "X", "message": "m", "traceback": "t"}
    assert cap_error(small, 256) is small


def test_a_10_mb_message_keeps_the_head_of_message_and_traceback() -> None:
    err = error_dict(_raised(10 * MB), 65536)
    assert err["type"] == "RuntimeError"
    assert _error_size(err) <= 65536 + 2 * MARKER
    assert err["message"].startswith(limit_tasks.HEAD)
    assert err["message"].endswith(" bytes dropped]")
    assert "… [bulkrunner: cut at jobs.max_error_size (65536 bytes); " in err["message"]
    # The traceback keeps its head: the frames, outermost first.
    assert err["traceback"].startswith("Traceback (most recent call last):\n")
    assert "limit_tasks.py" in err["traceback"]
    assert err["traceback"].endswith(" bytes dropped]")
    dropped = int(err["message"].rsplit("; ", 1)[1].split()[0])
    kept = _bytes(err["message"].split(" … [bulkrunner", 1)[0])
    assert kept + dropped == len(limit_tasks.HEAD) + 10 * MB


def test_a_small_message_leaves_its_room_to_the_traceback() -> None:
    tb = "Traceback (most recent call last):\n" + "  frame\n" * 10_000
    err = cap_error({"type": "E", "message": "boom", "traceback": tb}, 1000)
    assert err["message"] == "boom"
    assert _bytes(err["traceback"]) <= 1000 - 4 + MARKER
    assert err["traceback"].startswith(tb[:900])


def test_the_cut_counts_utf8_bytes_and_splits_no_character() -> None:
    err = error_dict(_raised(MB, "é"), 4096)
    assert _error_size(err) <= 4096 + 2 * MARKER
    head = err["message"].split(" … [bulkrunner", 1)[0]
    assert head.startswith(limit_tasks.HEAD) and set(head[len(limit_tasks.HEAD):]) == {"é"}


def test_a_long_type_name_is_cut() -> None:
    err = cap_error({"type": "T" * 10_000, "message": "m", "traceback": ""}, 256)
    assert err["type"] == "T" * 200 and err["message"] == "m"


def test_run_item_caps_by_the_work_units_limit() -> None:
    out = run_item(work_unit("tests.limit_tasks:huge_error", {"size": 10 * MB},
                             max_error_size=1024))
    assert not out.ok and out.error is not None
    assert _error_size(out.error) <= 1024 + 2 * MARKER
    assert "(1024 bytes)" in out.error["message"]


# --------------------------------------------------------------------------- through the API
def test_huge_errors_are_capped_and_the_job_list_stays_small(
        app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LIMIT_TASKS)
    client = app.test_client()
    ids = []
    for _ in range(20):
        r = client.post(JOBS, json={"task": "huge_error", "params": {"size": 10 * MB}})
        assert r.status_code == 202, r.get_data(as_text=True)
        ids.append(r.get_json()["id"])
    for ident in ids:
        assert wait_app_job(client, ident, 60)["state"] == "failed"

    # The item detail has the head and the marker, within the limit.
    item = client.get(f"{JOBS}/{ids[0]}/items").get_json()["items"][0]
    err = item["error"]
    assert _error_size(err) <= 65536 + 2 * MARKER
    assert err["message"].startswith(limit_tasks.HEAD)
    assert "[bulkrunner: cut at jobs.max_error_size (65536 bytes)" in err["message"]
    assert "[bulkrunner: cut at jobs.max_error_size (65536 bytes)" in err["traceback"]
    assert all(len(e["message"]) <= 65536 + MARKER for e in item["errors"])
    # The single job keeps its traceback ...
    job = client.get(f"{JOBS}/{ids[0]}").get_json()
    assert job["error"]["traceback"].startswith("Traceback (most recent call last):")
    # ... the list leaves it out.
    r = client.get(f"{JOBS}?limit=20")
    assert r.status_code == 200
    assert len(r.data) < 2 * MB
    page = r.get_json()
    assert len(page["jobs"]) == 20
    assert "traceback" not in _keys(page)
    assert all(j["error"]["message"].startswith(limit_tasks.HEAD) for j in page["jobs"])
    assert all(j["error"]["type"] == "RuntimeError" for j in page["jobs"])


def test_a_smaller_max_error_size_from_the_config(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LIMIT_TASKS, jobs="max_error_size = 2048")
    client = app.test_client()
    r = client.post(JOBS, json={"task": "huge_error", "params": {"size": MB}})
    assert wait_app_job(client, r.get_json()["id"])["state"] == "failed"
    err = client.get(f"{JOBS}/{r.get_json()['id']}").get_json()["error"]
    assert _error_size(err) <= 2048 + 2 * MARKER and "(2048 bytes)" in err["message"]


# --------------------------------------------------------------------------- numbers in the URL
@pytest.fixture
def client(app_factory: Callable[..., Flask]) -> FlaskClient:
    return app_factory().test_client()


def _assert_error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def _one_job(client: FlaskClient) -> str:
    r = client.post(JOBS, json={"task": "add", "params": {"a": 1}})
    ident = str(r.get_json()["id"])
    wait_app_job(client, ident)
    return ident


@pytest.mark.parametrize("index", [str(2**63), str(10**30), "9" * 5000, "-1", "1e3", "x"])
def test_an_item_index_out_of_range_is_404(client: FlaskClient, index: str) -> None:
    ident = _one_job(client)
    err = _assert_error(client.get(f"{JOBS}/{ident}/items/{index}/log"), 404, "not_found")
    assert len(err["message"]) < 200


def test_the_largest_index_is_looked_up(client: FlaskClient) -> None:
    ident = _one_job(client)
    err = _assert_error(client.get(f"{JOBS}/{ident}/items/{2**63 - 1}/log"), 404,
                        "not_found")
    assert err["details"] == {"index": 2**63 - 1}  # the store's answer
    assert client.get(f"{JOBS}/{ident}/items/0/log").status_code == 200


@pytest.mark.parametrize("query", [
    "items?after=" + str(2**63), "items?after=" + str(10**30), "items?after=" + "9" * 5000,
    "items?limit=" + str(2**63), "items?limit=" + "9" * 5000, "items?limit=0",
    "items/0/log?after=" + str(10**30), "items/0/log?after=" + "9" * 5000,
])
def test_huge_query_numbers_are_400(client: FlaskClient, query: str) -> None:
    ident = _one_job(client)
    _assert_error(client.get(f"{JOBS}/{ident}/{query}"), 400, "invalid_request")


@pytest.mark.parametrize("query", ["limit=" + str(10**30), "before=" + str(2**63),
                                   "before=" + "9" * 5000])
def test_huge_job_list_numbers_are_400(client: FlaskClient, query: str) -> None:
    _assert_error(client.get(f"{JOBS}?{query}"), 400, "invalid_request")


# --------------------------------------------------------------------------- CSV rows
ADD = task_from_function("add", "tests.sample_tasks:add", sample_tasks.add)
OVERSIZED = "a,b\n1,2\n3,4\n5,6\n7," + "9" * 140_000 + "\n8,9\n"  # row 5's cell > 128 KiB


def test_an_oversized_csv_cell_is_named_by_its_own_row() -> None:
    with pytest.raises(InvalidSubmission) as e:
        parse_items(OVERSIZED.encode(), "csv", ADD)
    assert list(e.value.fields) == ["row 5 (item 3)"] and e.value.details["row"] == 5
    assert "field larger than field limit" in e.value.fields["row 5 (item 3)"]


def test_an_oversized_csv_cell_upload_is_422_naming_row_5(client: FlaskClient) -> None:
    form = {"items": (io.BytesIO(OVERSIZED.encode()), "items.csv"), "task": "add"}
    err = _assert_error(client.post(JOBS, data=form, content_type="multipart/form-data"),
                        422, "invalid_submission")
    assert "row 5 (item 3)" in err["details"]["fields"] and err["details"]["row"] == 5
    assert not any(k.startswith("row 4") for k in err["details"]["fields"])


# --------------------------------------------------------------------------- pass-through output
class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_writes_outside_items_are_capped_per_second() -> None:
    real, clock = io.StringIO(), Clock()
    router = capture._Router(real, limit=250, clock=clock)  # type: ignore[arg-type]
    for i in range(10):
        router.write(f"{i}" * 99 + "\n")
    router.write("\n")  # it would fit, but once a second drops, the rest of it drops too
    assert real.getvalue() == "0" * 99 + "\n" + "1" * 99 + "\n"
    router.report_drops()  # the second is not over: nothing yet
    assert real.getvalue().count("\n") == 2
    clock.now += 1.0
    assert router.write("next\n") == 5
    lines = real.getvalue().splitlines()
    assert lines[2] == ("[bulkrunner: dropped 801 characters in 9 writes to the stream from "
                        "threads that run no item, over the limit of 250 a second]")
    assert lines[3] == "next"


def test_the_notice_comes_without_a_later_write() -> None:
    real, clock = io.StringIO(), Clock()
    router = capture._Router(real, limit=10, clock=clock)  # type: ignore[arg-type]
    router.write("a" * 11)
    assert real.getvalue() == ""
    clock.now += 1.5
    router.report_drops()
    assert real.getvalue().startswith("[bulkrunner: dropped 11 characters in 1 writes")
    router.report_drops()
    assert real.getvalue().count("[bulkrunner") == 1


def test_writes_of_an_item_are_not_rate_limited() -> None:
    real, chunks = io.StringIO(), []
    router = capture._Router(real, limit=10, clock=Clock())  # type: ignore[arg-type]
    log = capture.begin((1, 0), 1, lambda key, claim, text: chunks.append(text), 10_000)
    try:
        router.write("z" * 5000)
    finally:
        capture.end(log)
    assert "".join(chunks) == "z" * 5000 and real.getvalue() == ""


@pytest.mark.parametrize("jobs", ["", "max_log_size = 0"])  # captured or not, it is capped
def test_a_thread_a_task_starts_cannot_flood_the_servers_output(
        app_factory: Callable[..., Flask], capsys: pytest.CaptureFixture[str],
        jobs: str) -> None:
    app = app_factory(tasks=LIMIT_TASKS, max_workers=1, jobs=jobs)
    client = app.test_client()
    r = client.post(JOBS, json={"task": "thread_flood", "params": {"size": 4 * MB}})
    assert wait_app_job(client, r.get_json()["id"], 60)["state"] == "succeeded"
    seen: list[str] = []

    def noticed() -> bool:
        seen.append(capsys.readouterr().out)
        return "[bulkrunner: dropped " in "".join(seen)

    wait_for(noticed, 10, "the notice of dropped output")
    out = "".join(seen)
    assert out.count("y" * 99) < 4 * MB // 100 // 4  # most of the flood was dropped
    assert "characters in " in out and "over the limit of 65536 a second" in out
