"""Webhooks against a real server and a receiver on loopback: one signed POST per finished
job (succeeded, failed, cancelled) whose HMAC checks; retries keep the delivery id; a
receiver that is down across a kill -9 and restart still gets the POST; a per-job URL
outside ``[notify] allowed`` is a 422; a receiver that never answers 2xx ends the delivery
``failed`` while the job stays succeeded."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.errors import ApiError
from bulkrunner.server.notify import backoff_delay, notify_url_problem, under_prefix
from tests.conftest import free_port, run_cli, toml_config, wait_for, wait_job

SECRET = "test-secret-9f2c"


class Receiver:
    """A webhook receiver on a loopback port: records every POST; answers each path with
    the statuses scripted for it, in turn (200 once they run out)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.posts: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    statuses = receiver.script.get(self.path, [])
                    status = statuses.pop(0) if statuses else 200
                    receiver.posts.append({"path": self.path, "body": body,
                                           "headers": {k.lower(): v for k, v in
                                                       self.headers.items()},
                                           "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def to(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.posts if p["path"] == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _config(tmp: Path, allowed: str, max_attempts: int = 3, extra: str = "") -> Path:
    return toml_config(tmp, extra=f'{extra}\n[notify]\nsecret = "{SECRET}"\n'
                                  f'allowed = ["{allowed}"]\nmax_attempts = {max_attempts}\n')


def _notice(post: dict[str, Any]) -> dict[str, Any]:
    """The POST's JSON, after checking its signature over the exact body bytes."""
    want = "sha256=" + hmac.new(SECRET.encode(), post["body"], hashlib.sha256).hexdigest()
    got = post["headers"].get("x-bulkrunner-signature", "")
    assert hmac.compare_digest(got, want), f"bad signature {got!r}"
    assert post["headers"]["content-type"] == "application/json"
    notice: dict[str, Any] = json.loads(post["body"])
    assert notice["event"] == "job.finished"
    return notice


def _notify_state(c: Client, job_id: str, state: str, timeout: float = 15
                  ) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = c.job(job_id)
        return job if job["notify"] and job["notify"]["state"] == state else None
    found: dict[str, Any] = wait_for(reached, timeout, f"job {job_id}'s webhook {state}",
                                     interval=0.1)
    return found


@pytest.mark.slow
def test_one_signed_post_per_finished_job(serve: Any, tmp_path: Path,
                                          receiver: Receiver) -> None:
    hooked = f'[tasks.hooked]\npath = "tests.sample_tasks:add"\nnotify = "{receiver.url}/task"\n'
    srv = serve(_config(tmp_path, f"{receiver.url}/", extra=hooked))
    with Client(srv.url) as c:
        ok = c.submit("square", {"x": 3}, notify_url=f"{receiver.url}/jobs")
        assert ok["notify"] == {"url": f"{receiver.url}/jobs", "state": "pending",
                                "attempts": 0}
        bad = c.submit("square", {"x": -1}, notify_url=f"{receiver.url}/jobs")
        slow = c.submit("slow", {"seconds": 30}, notify_url=f"{receiver.url}/jobs")
        wait_job(c, slow["id"], 10, states=("running",))
        c.cancel(slow["id"])
        by_task = c.submit("hooked", {"a": 1})  # the task's own notify URL
        plain = c.submit("square", {"x": 2})  # no webhook
        jobs = {j["id"]: j for j in (ok, bad, slow, by_task)}
        for job_id in jobs:
            done = _notify_state(c, job_id, "delivered")
            assert done["notify"]["attempts"] == 1
            jobs[job_id] = done
        assert wait_job(c, plain["id"], 10)["notify"] is None
    notices = [(_notice(p), p) for p in receiver.posts]
    seen = [n["job"]["id"] for n, _ in notices]
    assert sorted(seen) == sorted(jobs), f"one POST per finished job: {seen}"
    deliveries = {p["headers"]["x-bulkrunner-delivery"] for _, p in notices}
    assert len(deliveries) == len(jobs), "each delivery has its own id"
    states = {n["job"]["id"]: n["job"]["state"] for n, _ in notices}
    assert states == {ok["id"]: "succeeded", bad["id"]: "failed", slow["id"]: "cancelled",
                      by_task["id"]: "succeeded"}
    for notice, post in notices:
        job = jobs[notice["job"]["id"]]
        # The job as GET shows it (its webhook still pending at the time it was sent).
        assert set(notice["job"]) == set(job)
        assert notice["job"]["notify"]["state"] == "pending"
        assert notice["job"]["finished_at"] == job["finished_at"]
        assert post["path"] == ("/task" if job["id"] == by_task["id"] else "/jobs")


@pytest.mark.slow
def test_500_500_200_is_delivered_with_the_same_delivery_id(serve: Any, tmp_path: Path,
                                                           receiver: Receiver) -> None:
    receiver.script["/flaky"] = [500, 500]
    srv = serve(_config(tmp_path, f"{receiver.url}/", max_attempts=3))
    with Client(srv.url) as c:
        job = c.submit("square", {"x": 4}, notify_url=f"{receiver.url}/flaky")
        done = _notify_state(c, job["id"], "delivered", timeout=20)
        metrics = c.request("GET", "/metrics", stream=True).read().decode()
    assert done["notify"]["attempts"] == 3 and done["state"] == "succeeded"
    posts = receiver.to("/flaky")
    assert [p["status"] for p in posts] == [500, 500, 200]
    assert len({p["headers"]["x-bulkrunner-delivery"] for p in posts}) == 1
    assert len({p["body"] for p in posts}) == 1, "every attempt sends the same bytes"
    assert {_notice(p)["job"]["id"] for p in posts} == {job["id"]}
    assert 'bulkrunner_webhook_attempts_total{outcome="retrying"} 2.0' in metrics
    assert 'bulkrunner_webhook_attempts_total{outcome="delivered"} 1.0' in metrics


@pytest.mark.slow
def test_a_receiver_down_across_a_kill_and_restart_still_gets_the_post(
        serve: Any, tmp_path: Path) -> None:
    down = Receiver(free_port())  # nothing listens there yet: refused connections
    cfg = _config(tmp_path, f"{down.url}/", max_attempts=8)
    srv = serve(cfg)
    with Client(srv.url) as c:
        job = c.submit("square", {"x": 5}, notify_url=f"{down.url}/later")
        wait_for(lambda: (c.job(job["id"])["notify"] or {}).get("attempts", 0) >= 1, 15,
                 "a first, refused attempt")
    srv.stop()  # kill -9 with the delivery pending
    down.start()
    try:
        srv = serve(cfg)
        with Client(srv.url) as c:
            done = _notify_state(c, job["id"], "delivered", timeout=20)
        posts = down.to("/later")
    finally:
        down.stop()
    assert done["notify"]["attempts"] >= 2 and done["state"] == "succeeded"
    assert [_notice(p)["job"]["id"] for p in posts] == [job["id"]]


@pytest.mark.slow
def test_a_per_job_url_outside_allowed_is_a_422(serve: Any, tmp_path: Path,
                                                receiver: Receiver) -> None:
    srv = serve(_config(tmp_path, f"{receiver.url}/hooks/"))
    with Client(srv.url) as c:
        for url in (f"{receiver.url}/other", "http://169.254.169.254/latest",
                    f"{receiver.url}/hooks", "ftp://127.0.0.1/hooks/x", 42):
            with pytest.raises(ApiError) as e:
                c.submit("square", {"x": 1}, notify_url=url)
            assert e.value.status == 422, url
            assert "notify_url" in e.value.details["fields"], e.value.details
        assert c.jobs()["jobs"] == [], "a refused submission stores nothing"
        ok = c.submit("square", {"x": 1}, notify_url=f"{receiver.url}/hooks/a?b=1")
        assert ok["notify"]["url"] == f"{receiver.url}/hooks/a?b=1"
    out = run_cli("submit", "square", "-p", "x=1", "--notify", f"{receiver.url}/nope",
                  url=srv.url)
    assert out.returncode == 2 and "notify_url" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_server_without_allowed_prefixes_refuses_per_job_urls(serve: Any,
                                                                tmp_path: Path) -> None:
    srv = serve(toml_config(tmp_path))
    with Client(srv.url) as c, pytest.raises(ApiError) as e:
        c.submit("square", {"x": 1}, notify_url="https://hooks.example.com/x")
    assert e.value.status == 422
    assert "[notify] allowed is empty" in e.value.details["fields"]["notify_url"]


@pytest.mark.slow
def test_permanent_failure_ends_failed_and_the_job_stays_succeeded(
        serve: Any, tmp_path: Path, receiver: Receiver) -> None:
    receiver.script["/broken"] = [500] * 10
    srv = serve(_config(tmp_path, f"{receiver.url}/", max_attempts=3))
    with Client(srv.url) as c:
        job = c.submit("square", {"x": 6}, notify_url=f"{receiver.url}/broken")
        done = _notify_state(c, job["id"], "failed", timeout=20)
        metrics = c.request("GET", "/metrics", stream=True).read().decode()
    assert done["state"] == "succeeded" and done["result"] == 36
    assert done["notify"]["attempts"] == 3
    assert len(receiver.to("/broken")) == 3
    assert 'bulkrunner_webhook_attempts_total{outcome="failed"} 1.0' in metrics
    assert "bulkrunner_webhooks_pending 0.0" in metrics
    # The line is logged just after the state is stored: wait for it, do not race it.
    wait_for(lambda: "failed after 3 attempt(s)" in srv.log(), 10,
             "the final webhook failure was never logged")


NOTIFY_ERRORS = [
    ('[tasks.hooked]\npath = "tests.sample_tasks:add"\nnotify = "hooks.example.com"\n',
     "tasks.hooked.notify", "http or https URL"),
    ('[notify]\nsecret_file = "missing-secret"\n', "notify.secret_file", "cannot read"),
    ('[notify]\nmax_attempts = 0\n', "notify.max_attempts", "at least 1"),
]


@pytest.mark.parametrize(("toml", "key", "says"), NOTIFY_ERRORS,
                         ids=[k for _, k, _ in NOTIFY_ERRORS])
def test_a_bad_notify_config_stops_serve_with_exit_2(tmp_path: Path, toml: str, key: str,
                                                     says: str) -> None:
    cfg = toml_config(tmp_path, extra=toml)
    out = run_cli("--config", str(cfg), "serve", cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"key {key}:" in out.stderr and says in out.stderr, out.stderr


def test_prefixes_match_at_a_boundary() -> None:
    assert under_prefix("https://hooks.example.com/a", ["https://hooks.example.com"])
    assert under_prefix("https://hooks.example.com", ["https://hooks.example.com"])
    assert under_prefix("https://hooks.example.com?x=1", ["https://hooks.example.com"])
    assert not under_prefix("https://hooks.example.com.evil.org/",
                            ["https://hooks.example.com"])
    assert not under_prefix("https://hooks.example.com:444/", ["https://hooks.example.com"])
    assert under_prefix("https://h.example/team/x", ["https://h.example/team/"])
    assert not under_prefix("https://h.example/teamx", ["https://h.example/team/"])
    assert notify_url_problem("https://u:p@h.example/team/x", ["https://u:p@h.example/"])


def test_backoff_doubles_from_one_second_to_ten_minutes_with_jitter() -> None:
    assert backoff_delay(1, lambda: 0.0) == 1.0
    assert backoff_delay(1, lambda: 1.0) == 1.5
    assert backoff_delay(2, lambda: 0.0) == 2.0
    assert backoff_delay(5, lambda: 0.0) == 16.0
    assert backoff_delay(10, lambda: 0.0) == 512.0
    assert backoff_delay(11, lambda: 0.0) == 600.0
    assert backoff_delay(1000, lambda: 1.0) == 600.0
