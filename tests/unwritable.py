"""What the disk-full and locked-database tests share: a real server whose database is about
to become unwritable, the requests they send it, and the checks they make of it.

The scenario: a few jobs finish; a job of two ``gate`` items (tests/unwritable_tasks.py)
starts and waits; the test makes the database unwritable (fills the disk, or holds the write
lock from another connection); submissions are refused with 503; the gate opens, the items
finish on their workers and their outcomes wait in the server's memory; the test frees the
database; the outcomes are recorded, /healthz is 200 again, and every job is whole.
"""

from __future__ import annotations

import http.client
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulkrunner.client import Client
from tests.conftest import (
    FINISHED,
    JOBS,
    SAMPLE_TASKS,
    ServerProcess,
    all_items,
    toml_config,
    wait_for,
    wait_job,
)

TASKS = {**SAMPLE_TASKS, "gate": "tests.unwritable_tasks:gate"}
#: What the dispatcher logs when its write fails, and when writes work again.
CANNOT_WRITE = "cannot write the database"
WRITTEN_AGAIN = "can be written again"


def config(tmp_path: Path) -> Path:
    """A server config: two thread workers, the test tasks and ``gate``."""
    return toml_config(tmp_path, max_workers=2, tasks=TASKS)


def request(url: str, method: str, path: str, body: Any = None,
            timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, lower-cased headers, decoded JSON)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                json.loads(raw) if raw else None)
    finally:
        conn.close()


def assert_error_shape(status: int, body: Any, what: str) -> dict[str, Any]:
    """``body`` is the API's error shape; returns its ``error``."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: {status} {body!r}"
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "details"}, f"{what}: {status} {body!r}"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", err["code"]), f"{what}: code {err['code']!r}"
    assert isinstance(err["message"], str) and err["message"], f"{what}: no message"
    assert isinstance(err["details"], dict), f"{what}: details {err['details']!r}"
    return err


class Scenario:
    """A real server and the jobs it accepted, with the steps and checks of the tests."""

    def __init__(self, srv: ServerProcess, work: Path, size: int) -> None:
        self.srv = srv
        self.release = work / "release"   # the gate opens when this file exists
        self.done = work / "done"         # each gate item appends its index here
        self.size = size                  # characters in each gate item's result
        self.accepted: set[str] = set()
        self.client = Client(srv.url)
        self.gated = ""

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        status, headers, data = request(self.srv.url, "POST", JOBS, body)
        if status in (200, 202):
            self.accepted.add(data["id"])
        return status, headers, data

    def health(self) -> tuple[int, dict[str, Any]]:
        status, _, data = request(self.srv.url, "GET", "/healthz")
        return status, data

    # ------------------------------------------------------------------ the steps
    def prepare(self) -> None:
        """Some finished jobs (one-item and a bulk), then the gated job of two items
        running on both workers."""
        first = [self.submit({"task": "add", "params": {"a": n}}) for n in range(3)]
        first.append(self.submit({"task": "add", "items": [{"a": n} for n in range(20)]}))
        for status, _, data in first:
            assert status == 202, (status, data)
            wait_job(self.client, data["id"], 30)
        status, _, data = self.submit({
            "task": "gate", "params": {"release": str(self.release), "done": str(self.done),
                                       "size": self.size},
            "items": [{"i": 0}, {"i": 1}]})
        assert status == 202, (status, data)
        self.gated = data["id"]
        wait_for(lambda: self.client.job(self.gated)["items"]["running"] == 2, 30,
                 "both gate items to start")

    def refused(self, code: str) -> tuple[int, dict[str, str], Any]:
        """Submissions of every shape get 503 with Retry-After and the error shape, code
        ``code``; returns what the first one got."""
        bodies = [{"task": "add", "params": {"a": 1000}},
                  {"task": "add", "items": [{"a": 1000 + n} for n in range(200)]},
                  {"task": "add", "params": {"a": 1000}, "key": "refused-with-a-key"}]
        answers = []
        for body in bodies:
            status, headers, data = self.submit(body)
            what = f"submission of {len(body.get('items', [0]))} item(s)"
            assert status == 503, f"{what}: {status} {data!r}"
            err = assert_error_shape(status, data, what)
            assert err["code"] == code, f"{what}: {err!r}"
            assert int(headers.get("retry-after", "0")) > 0, f"{what}: headers {headers}"
            answers.append((status, headers, data))
        return answers[0]

    def unhealthy(self, code: str) -> dict[str, Any]:
        """/healthz answers 503 naming the cause."""
        _, h = wait_for(lambda: (r := self.health())[0] == 503 and r, 30,
                        f"/healthz to answer 503 {code}")
        assert h["status"] == code and h["store"]["ok"] is False, h
        assert h["store"]["detail"], h
        return h

    def finish_gated_while_unwritable(self) -> None:
        """Open the gate: both items finish on their workers, the dispatcher cannot record
        them and says so once; the database still shows them running; reads still work."""
        self.release.touch()
        wait_for(lambda: self.done.exists() and len(self.done.read_text().split()) == 2,
                 30, "both gate items to finish on their workers")
        wait_for(lambda: CANNOT_WRITE in self.srv.log(), 30,
                 "the dispatcher to log that it cannot write the database")
        job = self.client.job(self.gated)
        assert job["items"]["running"] == 2 and job["state"] == "running", job
        self.alive()

    def recovered(self) -> dict[str, Any]:
        """After the cause is gone: /healthz 200 again, the outcomes computed meanwhile
        recorded with their results, new submissions accepted and run."""
        wait_for(lambda: self.health()[0] == 200, 60, "/healthz to answer 200 again")
        job = wait_job(self.client, self.gated, 60)
        assert job["state"] == "succeeded", job
        results = sorted(it["result"] for it in all_items(self.client, self.gated))
        assert results == [f"{i}:" + "x" * self.size for i in (0, 1)], \
            [r[:20] for r in results]
        status, _, data = self.submit({"task": "add", "params": {"a": 7}})
        assert status == 202, (status, data)
        assert wait_job(self.client, data["id"], 30)["result"] == 8
        wait_for(lambda: WRITTEN_AGAIN in self.srv.log(), 30,
                 "the dispatcher to log that the database can be written again")
        status, h = self.health()
        assert status == 200 and h["status"] == "ok" and h["store"]["ok"], h
        return job

    # ------------------------------------------------------------------ the checks
    def alive(self) -> None:
        assert self.srv.proc is not None and self.srv.proc.poll() is None, \
            f"the server exited:\n{self.srv.log()}"

    def whole(self, warned: bool = True) -> None:
        """Exactly the accepted jobs exist, each whole (counts equal its items), all
        finished; the server is up; the dispatcher warned once (``warned``, at most once
        otherwise), not per try, and neither it nor a request logged a traceback."""
        jobs: list[dict[str, Any]] = []
        before = None
        while True:
            page = self.client.jobs(limit=100, before=before)
            jobs += page["jobs"]
            before = page["next"]
            if before is None:
                break
        assert {j["id"] for j in jobs} == self.accepted
        for j in jobs:
            items = all_items(self.client, j["id"])
            counts = {k: v for k, v in j["items"].items() if k != "total"}
            assert len(items) == j["items"]["total"] == sum(counts.values()), j
            assert Counter(it["state"] for it in items) == +Counter(counts), j
            assert j["state"] in FINISHED, j
        self.alive()
        log = self.srv.log()
        for failure in ("dispatcher error", "unexpected error on", "Exception in thread"):
            assert failure not in log, log
        dispatcher = re.findall(r"^.* (?:WARNING|ERROR) bulkrunner\.dispatcher: .*$", log,
                                re.MULTILINE)
        assert len(dispatcher) == 1 if warned else len(dispatcher) <= 1, dispatcher
        assert all(CANNOT_WRITE in line for line in dispatcher), dispatcher
