"""Why a bulk failed: the job's ``failures`` groups, ``results?state=``, and the CLI's
``items``, ``results --state`` and ``status`` / ``wait`` showing the groups.

The in-process app (Flask test client) runs the real dispatcher on the thread executor;
the CLI tests use one real ``bulkrunner serve`` for the module.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.client import Client, display
from bulkrunner.client.cli import cli
from tests.conftest import (
    SAMPLE_TASKS,
    ServerProcess,
    run_cli,
    toml_config,
    wait_app_job,
    wait_job,
)
from tests.failure_tasks import LONG

JOBS = "/api/v1/jobs"
TASKS = {**SAMPLE_TASKS, "judge": "tests.failure_tasks:judge",
         "distinct": "tests.failure_tasks:distinct"}
N = 30
# What judge(n) does for n in range(30), by error: the items, in index order.
VALUE = [n for n in range(N) if n % 3 == 0]                        # 10, first 0
ROUND = [n for n in range(N) if n % 3 and n % 5 == 0]              # 4: 5 10 20 25
KIND = [7, 22]                                                     # 2, first 7
LONGS = [28, 29]                                                   # 2, first 28
FAILED = sorted(VALUE + ROUND + KIND + LONGS)
CUT = (LONG + "28")[:500] + "…"
EXPECTED = [
    {"type": "ValueError", "message": "bad input", "count": 10, "first_index": 0},
    {"type": "RuntimeError", "message": "too round\nfor 1", "count": 2, "first_index": 5},
    {"type": "RuntimeError", "message": "too round\nfor 0", "count": 2, "first_index": 10},
    {"type": "TypeError", "message": "wrong kind", "count": 2, "first_index": 7},
    {"type": "OSError", "message": CUT, "count": 2, "first_index": 28},
]
# Sorted by count, then first index: the three groups of two come as 5, 7, 10, 28.
EXPECTED = [EXPECTED[0], EXPECTED[1], EXPECTED[3], EXPECTED[2], EXPECTED[4]]


def bulk(task: str = "judge", n: int = N) -> dict[str, Any]:
    return {"task": task, "items": [{"n": i} for i in range(n)]}


# --------------------------------------------------------------------------- the API
@pytest.fixture
def app(app_factory: Callable[..., Flask]) -> Flask:
    return app_factory(tasks=TASKS, max_workers=4)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def run(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(JOBS, json=body)
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.get_json()["failures"] == []  # a new job has none (and no query for them)
    return wait_app_job(client, r.get_json()["id"])


def test_failures_are_grouped_most_frequent_first(client: FlaskClient) -> None:
    job = run(client, bulk())
    assert job["state"] == "failed"
    assert job["items"]["failed"] == len(FAILED) and job["items"]["succeeded"] == N - len(FAILED)
    assert job["error"] is None  # a bulk has no single error: the groups say why
    assert job["failures"] == EXPECTED
    assert sum(g["count"] for g in job["failures"]) == job["items"]["failed"]
    # The job list shows them too.
    listed = client.get(f"{JOBS}?limit=5").get_json()["jobs"]
    assert next(j for j in listed if j["id"] == job["id"])["failures"] == EXPECTED
    assert client.get(f"{JOBS}/{job['id'][:10]}").get_json()["failures"] == EXPECTED


def test_a_clean_job_has_no_failures(client: FlaskClient) -> None:
    job = run(client, {"task": "add", "items": [{"a": i} for i in range(5)]})
    assert job["state"] == "succeeded" and job["failures"] == []
    single = run(client, {"task": "square", "params": {"x": -4}})
    assert single["error"]["message"] == "negative: -4"
    assert single["failures"] == [{"type": "ValueError", "message": "negative: -4",
                                   "count": 1, "first_index": 0}]
    listed = client.get(f"{JOBS}?limit=2").get_json()["jobs"]
    assert [j["failures"] for j in listed] == [single["failures"], []]


def test_at_most_ten_groups(client: FlaskClient) -> None:
    job = run(client, bulk("distinct", 12))
    assert job["items"]["failed"] == 12
    assert [g["message"] for g in job["failures"]] == [f"message {i:02d}" for i in range(10)]
    assert [g["first_index"] for g in job["failures"]] == list(range(10))
    assert all(g["count"] == 1 for g in job["failures"])
    text = display.summary(job)
    assert "… and 2 more failed item(s) with other errors" in text, text


def test_no_grouping_query_for_a_job_without_failures(app: Flask,
                                                      client: FlaskClient) -> None:
    clean = run(client, {"task": "add", "items": [{"a": i} for i in range(3)]})
    failed = run(client, bulk("judge", 4))
    sql: list[str] = []
    # The test client answers in this thread, on this thread's reader connection.
    app.extensions["bulkrunner"].store._read().set_trace_callback(sql.append)
    assert client.get(f"{JOBS}/{clean['id']}").get_json()["failures"] == []
    assert not any("json_extract" in q for q in sql), sql
    client.get(f"{JOBS}?limit=1000")
    assert sum("json_extract" in q for q in sql) == 1, sql  # the failed job's, only
    assert client.get(f"{JOBS}/{failed['id']}").get_json()["failures"][0]["count"] == 2


def test_an_error_that_is_not_json_still_counts(app: Flask, client: FlaskClient) -> None:
    job = run(client, bulk("judge", 4))  # items 0 and 3 fail with ValueError
    with sqlite3.connect(app.extensions["bulkrunner"].store.path) as db:
        db.execute("UPDATE items SET error = 'not json' WHERE idx = 3 AND job_seq = "
                   "(SELECT seq FROM jobs WHERE id = ?)", (job["id"],))
    db.close()
    assert client.get(f"{JOBS}/{job['id']}").get_json()["failures"] == [
        {"type": "ValueError", "message": "bad input", "count": 1, "first_index": 0},
        {"type": "Error", "message": "unknown error", "count": 1, "first_index": 3}]


def test_results_state_filters_the_export(client: FlaskClient) -> None:
    job = run(client, bulk())
    r = client.get(f"{JOBS}/{job['id']}/results?format=jsonl&state=failed")
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    rows = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    assert [row["index"] for row in rows] == FAILED
    assert all(row["state"] == "failed" and row["error"]["type"] for row in rows)
    assert rows[0]["params"] == {"n": 0} and rows[0]["error"]["message"] == "bad input"
    r = client.get(f"{JOBS}/{job['id']}/results?format=csv&state=failed")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert [int(t["index"]) for t in table] == FAILED
    assert {t["state"] for t in table} == {"failed"}
    assert table[0]["n"] == "0" and "ValueError" in table[0]["error"]
    ok = client.get(f"{JOBS}/{job['id']}/results?state=succeeded").get_data(as_text=True)
    assert [json.loads(line)["index"] for line in ok.splitlines()] == [
        n for n in range(N) if n not in FAILED]
    assert client.get(f"{JOBS}/{job['id']}/results?state=cancelled").get_data() == b""
    # No state, or an empty one: every item.
    everything = client.get(f"{JOBS}/{job['id']}/results?state=").get_data(as_text=True)
    assert len(everything.splitlines()) == N


def test_results_unknown_state_is_400(client: FlaskClient) -> None:
    job = run(client, {"task": "noop"})
    r = client.get(f"{JOBS}/{job['id']}/results?state=bogus")
    assert r.status_code == 400, r.get_data(as_text=True)
    err = r.get_json()["error"]
    assert err["code"] == "invalid_request" and err["details"] == {"field": "state"}
    assert "state must be one of" in err["message"]
    # The state is checked before the job is looked up, like the format.
    assert client.get(f"{JOBS}/{'f' * 32}/results?state=bogus").status_code == 400
    assert client.get(f"{JOBS}/{'f' * 32}/results?state=failed").status_code == 404


def test_openapi_documents_failures_and_the_results_state(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    job = doc["components"]["schemas"]["Job"]
    assert "failures" in job["required"]
    group = job["properties"]["failures"]["items"]
    assert set(group["required"]) == {"type", "message", "count", "first_index"}
    params = doc["paths"]["/api/v1/jobs/{id}/results"]["get"]["parameters"]
    state = next(p for p in params if p["name"] == "state")
    assert state["in"] == "query" and "failed" in state["schema"]["enum"]


def test_summary_shows_the_groups_one_a_line() -> None:
    job = {"id": "a" * 32, "task": "judge", "state": "failed", "progress": 1.0,
           "items": {"total": 30, "succeeded": 12, "failed": 18, "running": 0, "queued": 0,
                     "cancelled": 0},
           "params": {}, "message": None, "created_at": None, "result": None,
           "error": None, "failures": EXPECTED}
    lines = display.summary(job).splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("failures"))
    assert lines[at] == "failures  10 × ValueError: bad input (first: item 0)"
    assert lines[at + 1] == "          2 × RuntimeError: too round\\nfor 1 (first: item 5)"
    assert lines[at + 2] == "          2 × TypeError: wrong kind (first: item 7)"
    assert lines[at + 4].startswith("          2 × OSError: xxx")
    assert lines[at + 4].endswith("… (first: item 28)")
    assert not any("more failed" in ln for ln in lines)
    # No failures: no line (and a job from an older server, without the key, is fine).
    job.pop("failures")
    assert "failures" not in display.summary(job)


def test_items_table_fits_the_width() -> None:
    items = [{"index": 3, "state": "failed", "attempts": 2, "params": {"s": "p" * 200},
              "result": None, "error": {"type": "ValueError", "message": "m" * 200}},
             {"index": 10, "state": "succeeded", "attempts": 1, "params": {"s": "q"},
              "result": {"r": [1, 2]}, "error": None},
             {"index": 11, "state": "queued", "attempts": 0, "params": {}, "result": None,
              "error": None}]
    text = display.items_table(items, width=80)
    lines = text.splitlines()
    assert lines[0].split() == ["INDEX", "STATE", "ATTEMPTS", "PARAMS", "RESULT", "/", "ERROR"]
    assert all(len(ln) < 80 for ln in lines), text
    assert '{"s":"ppp' in lines[1] and "…" in lines[1] and "ValueError: mmm" in lines[1]
    assert lines[2].split()[:4] == ["10", "succeeded", "1", '{"s":"q"}']
    assert lines[2].endswith('{"r":[1,2]}')
    assert lines[3].split() == ["11", "queued", "0", "{}"]
    wide = display.items_table(items[1:], width=200).splitlines()
    assert wide[1].endswith('{"r":[1,2]}') and "…" not in "".join(wide)
    assert display.items_table([]) == "no items"


# --------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("failures-server")
    with ServerProcess(toml_config(home, tasks=TASKS, max_workers=4)) as s:
        yield s


@pytest.fixture(scope="module")
def failed_bulk(server: ServerProcess) -> str:
    """The id of a finished judge bulk of 30 items, 18 of them failed."""
    with Client(server.url) as c:
        job = c.submit("judge", items=[{"n": i} for i in range(N)])
        assert wait_job(c, job["id"], 30)["state"] == "failed"
    return str(job["id"])


@pytest.fixture(autouse=True)
def _isolated(isolated_cwd: Path) -> None:
    """Every test runs in its own tmp_path, without $BULKRUNNER_* (see conftest)."""


def br(server: ServerProcess, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--url", server.url, *args], catch_exceptions=False)


def test_cli_status_and_wait_say_why(server: ServerProcess, failed_bulk: str) -> None:
    r = br(server, "status", failed_bulk)
    assert r.exit_code == 0, r.output
    assert re.search(r"^state\s+failed$", r.stdout, re.M), r.stdout
    assert "failures  10 × ValueError: bad input (first: item 0)" in r.stdout, r.stdout
    assert "2 × TypeError: wrong kind (first: item 7)" in r.stdout
    data = json.loads(br(server, "status", failed_bulk, "--json").stdout)
    assert data["failures"] == EXPECTED
    w = br(server, "wait", failed_bulk, "--timeout", "30")
    assert w.exit_code == 1, w.output
    assert "10 × ValueError: bad input (first: item 0)" in w.stderr, w.stderr


def test_cli_submit_wait_says_why(server: ServerProcess, tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"n": n}) + "\n" for n in (1, 3, 6, 5)))
    r = br(server, "submit", "judge", "--items", str(items), "--wait")
    assert r.exit_code == 1, r.output
    assert "3 failed" in r.stderr  # the progress line, as before
    assert "failures  2 × ValueError: bad input (first: item 1)" in r.stderr, r.stderr
    assert "1 × RuntimeError: too round\\nfor 1 (first: item 3)" in r.stderr, r.stderr
    clean = br(server, "submit", "add", "-p", "a=1", "--wait")
    assert clean.exit_code == 0 and "failures" not in clean.output


def test_cli_items(server: ServerProcess, failed_bulk: str) -> None:
    r = br(server, "items", failed_bulk, "--state", "failed")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["INDEX", "STATE", "ATTEMPTS", "PARAMS"]
    assert [int(ln.split()[0]) for ln in lines[1:]] == FAILED
    assert lines[1].split()[:4] == ["0", "failed", "1", '{"n":0}']
    assert lines[1].endswith("ValueError: bad input")
    assert r.stderr == ""
    # Paged through `next` up to --limit; the rest is said on stderr.
    few = br(server, "items", failed_bulk, "--limit", "3")
    assert few.exit_code == 0, few.output
    assert [ln.split()[:2] for ln in few.stdout.splitlines()[1:]] == [
        ["0", "failed"], ["1", "succeeded"], ["2", "succeeded"]]
    assert few.stdout.splitlines()[2].endswith("1")  # judge(1) returns 1
    assert "more items after index 2" in few.stderr
    none = br(server, "items", failed_bulk, "--state", "cancelled")
    assert none.exit_code == 0 and none.stdout == "no cancelled items\n"


def test_cli_items_json_pages(server: ServerProcess, failed_bulk: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI follows ``next`` until --limit: a spy makes pages of at most 5 items."""
    calls: list[dict[str, Any]] = []
    real = Client.items

    def spy(self: Client, ident: str, **kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return real(self, ident, **{**kw, "limit": min(kw["limit"], 5)})

    monkeypatch.setattr(Client, "items", spy)
    r = br(server, "items", failed_bulk, "--json", "--state", "failed", "--limit", "1500")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [i["index"] for i in data["items"]] == FAILED and data["next"] is None
    assert data["items"][0]["error"]["message"] == "bad input"
    assert [c["limit"] for c in calls] == [1000, 1000, 1000, 1000]  # 5 + 5 + 5 + 3
    assert [c["after"] for c in calls] == [None, *(str(FAILED[i]) for i in (4, 9, 14))]
    calls.clear()
    part = json.loads(br(server, "items", failed_bulk, "--json", "--limit", "7").stdout)
    assert [i["index"] for i in part["items"]] == list(range(7)) and part["next"] == "6"
    assert [(c["limit"], c["after"]) for c in calls] == [(7, None), (2, "4")]


def test_cli_results_state(server: ServerProcess, failed_bulk: str, tmp_path: Path) -> None:
    r = br(server, "results", failed_bulk, "--state", "failed")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["index"] for row in rows] == FAILED
    out = tmp_path / "failed.csv"
    r = br(server, "results", failed_bulk, "--format", "csv", "--state", "failed", "-o",
           str(out))
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [int(t["index"]) for t in table] == FAILED
    every = br(server, "results", failed_bulk)
    assert len(every.stdout.splitlines()) == N
    bad = br(server, "results", failed_bulk, "--state", "bogus")
    assert bad.exit_code == 2 and "bogus" in bad.stderr


def test_cli_items_as_a_real_process(server: ServerProcess, failed_bulk: str) -> None:
    proc = run_cli("items", failed_bulk[:10], "--state", "failed", "--limit", "2",
                   url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == ["INDEX", "0", "3"]
    assert "more items after index 3" in proc.stderr
    missing = run_cli("items", "f" * 32, url=server.url)
    assert missing.returncode == 2 and "no job with id" in missing.stderr
    assert "Traceback" not in missing.stderr
