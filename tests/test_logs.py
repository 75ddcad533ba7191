"""Per-item logs: capture on both executors, the log route, `logs --follow` against a real
server, and the server's own log (`--log-format json`)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from bulkrunner.client import Client
from tests.conftest import (
    JOBS,
    LOG_TASKS,
    ServerProcess,
    cli_command,
    run_cli,
    toml_config,
    wait_app_job,
    work_unit,
)


def run(app: Flask, body: dict[str, Any], timeout: float = 30) -> str:
    """Submit and wait for the job to finish; returns its id."""
    client = app.test_client()
    r = client.post(JOBS, json=body)
    assert r.status_code == 202, r.get_json()
    ident = str(r.get_json()["id"])
    wait_app_job(client, ident, timeout)
    return ident


def item_log(app: Flask, ident: str, index: int = 0, after: int | None = None) -> Any:
    query = "" if after is None else f"?after={after}"
    return app.test_client().get(f"{JOBS}/{ident}/items/{index}/log{query}")


def own_lines(text: str, name: str, kinds: tuple[str, ...], n: int) -> None:
    """``text`` holds each of ``name``'s lines, in order, and nobody else's."""
    lines = [ln for ln in text.splitlines() if ln]
    for kind in kinds:
        mine = [ln for ln in lines if f"{name} {kind} " in ln]
        assert [ln.rsplit(" ", 1)[1] for ln in mine] == [str(i) for i in range(n)], text
    assert all(f"{name} " in ln for ln in lines), text


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_concurrent_items_each_get_only_their_own_lines(
        app_factory: Callable[..., Flask], executor: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # The server runs at INFO; in this process the root logger would stop task INFO lines.
    caplog.set_level("INFO", logger="tests.log_tasks")
    app = app_factory(executor=executor, max_workers=2, tasks=LOG_TASKS)
    ident = run(app, {"task": "chatter", "params": {"lines": 20, "delay": 0.01},
                      "items": [{"name": "alpha"}, {"name": "beta"}]}, timeout=60)
    items = app.test_client().get(f"{JOBS}/{ident}/items").get_json()["items"]
    # They ran at the same time, so their writes interleaved.
    assert items[0]["started_at"] < items[1]["finished_at"]
    assert items[1]["started_at"] < items[0]["finished_at"]
    for index, name in ((0, "alpha"), (1, "beta")):
        r = item_log(app, ident, index)
        assert r.status_code == 200 and r.mimetype == "text/plain"
        assert r.headers["X-Item-State"] == "succeeded"
        assert int(r.headers["X-Log-Size"]) == len(r.data)
        text = r.get_data(as_text=True)
        own_lines(text, name, ("out", "err", "log"), 20)
        assert f"INFO tests.log_tasks: {name} log 0" in text


def test_process_executor_captures_threads_the_task_starts(
        app_factory: Callable[..., Flask]) -> None:
    app = app_factory(executor="process", max_workers=1, tasks=LOG_TASKS)
    ident = run(app, {"task": "thread_print", "params": {"name": "T"}}, timeout=60)
    assert item_log(app, ident).get_data(as_text=True) == "T from a thread\n"


def test_capture_ends_with_the_item(app_factory: Callable[..., Flask],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    app = app_factory(tasks=LOG_TASKS)
    run(app, {"task": "chatter", "params": {"name": "inside", "lines": 1}})
    print("outside any item")
    out = capsys.readouterr()
    assert "outside any item" in out.out and "inside" not in out.out + out.err


def test_log_is_capped_keeping_the_head(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LOG_TASKS, jobs="max_log_size = 1000")
    ident = run(app, {"task": "flood", "params": {"size": 50_000, "line": 100}})
    text = item_log(app, ident).get_data(as_text=True)
    head, marker = text[:1000], text[1000:]
    assert head == ("x" * 99 + "\n") * 10
    assert marker.startswith("\n[bulkrunner: the log of this attempt reached "
                             "jobs.max_log_size (1000 bytes)")
    assert len(text) < 1200


def test_zero_max_log_size_captures_nothing(app_factory: Callable[..., Flask],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    app = app_factory(tasks=LOG_TASKS, jobs="max_log_size = 0")
    ident = run(app, {"task": "chatter", "params": {"name": "loose", "lines": 1}})
    r = item_log(app, ident)
    assert r.status_code == 200 and r.data == b"" and r.headers["X-Log-Size"] == "0"
    assert "loose out 0" in capsys.readouterr().out


def test_each_run_of_an_item_is_marked(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LOG_TASKS)
    ident = run(app, {"task": "print_then_fail", "params": {"name": "p"}, "max_attempts": 2})
    text = item_log(app, ident).get_data(as_text=True)
    assert text == "p before the failure\n--- run 2 ---\np before the failure\n"


def test_after_returns_only_what_is_new(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LOG_TASKS)
    ident = run(app, {"task": "odd_text"})
    whole = item_log(app, ident)
    text = whole.get_data(as_text=True)
    assert text == "naïve ✓\nhalf \\ud800 pair\n"
    size = int(whole.headers["X-Log-Size"])
    assert size == len(text.encode())
    assert item_log(app, ident, after=3).data == whole.data[3:]
    end = item_log(app, ident, after=size)
    assert end.data == b"" and end.headers["X-Log-Size"] == str(size)
    assert item_log(app, ident, after=size + 100).data == b""


def test_log_route_errors(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks=LOG_TASKS)
    ident = run(app, {"task": "add", "params": {"a": 1}})
    r = item_log(app, ident, 5)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    assert item_log(app, "f" * 32).status_code == 404
    r = app.test_client().get(f"{JOBS}/{ident}/items/0/log?after=-1")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_request"
    assert item_log(app, ident).data == b""  # an item that printed nothing


# --------------------------------------------------------------------------- real server
def test_logs_follow_shows_lines_as_they_are_printed(
        serve: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = serve(toml_config(tmp_path, tasks=LOG_TASKS))
    with Client(server.url) as client:
        ident = client.submit("ticker", {"n": 10, "delay": 0.2})["id"]
    seen: list[tuple[float, str]] = []
    empty = tmp_path / "cli"  # not the server's folder: the CLI would read its config
    empty.mkdir()
    with subprocess.Popen(cli_command("logs", ident[:8], "--follow", url=server.url),
                          cwd=empty, env=server.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append((time.monotonic(), line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert proc.wait(30) == 0, seen
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(10)
    assert [text for _, text in seen] == [f"tick {i}" for i in range(10)]
    # The ticks are 0.2 s apart: shown while printed, not all at once at the end.
    assert seen[-1][0] - seen[0][0] > 1.0, seen
    with Client(server.url) as client:
        assert client.job(ident)["state"] == "succeeded"
        chunk = client.item_log(ident, 0)
        assert chunk.data.decode().splitlines() == [f"tick {i}" for i in range(10)]
        assert chunk.state == "succeeded" and chunk.size == len(chunk.data)


def test_logs_without_follow_and_errors(serve: Callable[..., ServerProcess],
                                        tmp_path: Path) -> None:
    server = serve(toml_config(tmp_path, tasks=LOG_TASKS))
    with Client(server.url) as client:
        ident = client.submit("chatter", {"name": "c", "lines": 2})["id"]
        client.wait(ident, timeout=20)
    out = run_cli("logs", ident, url=server.url)
    assert out.returncode == 0, out.stderr
    # The server logs at INFO, so the task's logging.info lines are captured too.
    assert [ln.split(" INFO ")[-1] for ln in out.stdout.splitlines()] == [
        "c out 0", "c err 0", "tests.log_tasks: c log 0",
        "c out 1", "c err 1", "tests.log_tasks: c log 1"]
    out = run_cli("logs", ident, "--item", "3", url=server.url)
    assert out.returncode == 2 and "no item 3" in out.stderr


def test_json_server_log(serve: Callable[..., ServerProcess], tmp_path: Path) -> None:
    token, secret = "tok-9f8e7d6c5b4a", "hunter2-in-a-param"
    server = serve(toml_config(tmp_path, tasks=LOG_TASKS, server=f'token = "{token}"'),
                   args=["--log-format", "json"])
    with Client(server.url, token) as client:
        ok = client.submit("typed", {"n": 1, "ratio": 0.5, "flag": True, "name": secret})["id"]
        bad = client.submit("square", {"x": -2})["id"]
        chatty = client.submit("chatter", {"name": "quiet", "lines": 1})["id"]
        for ident in (ok, bad, chatty):
            client.wait(ident, timeout=20)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    lines = [ln for ln in server.log().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is a JSON object
    for rec in records:
        assert {"ts", "level", "logger", "message"} <= set(rec), rec
        assert rec["ts"].endswith("Z")

    def about(ident: str) -> list[str]:
        return [r["message"] for r in records if r.get("job_id") == ident]

    for ident in (ok, bad):
        msgs = about(ident)
        assert any("submitted" in m for m in msgs), msgs
        assert any("started" in m for m in msgs), msgs
        assert any("finished" in m for m in msgs), msgs
    assert any("finished: failed" in m for m in about(bad))
    assert [r["level"] for r in records if r.get("job_id") == bad and
            "finished" in r["message"]] == ["WARNING"]
    # The task's own output went to its item, not to the server log.
    assert "quiet" not in server.log()
    assert token not in server.log() and secret not in server.log()


# --------------------------------------------------------------------------- units
def test_item_log_cuts_at_the_limit_between_characters() -> None:
    from bulkrunner.runtime.capture import ItemLog

    got: list[tuple[tuple[int, int], int, str]] = []
    log = ItemLog((1, 0), 3, lambda *a: got.append(a), limit=5)
    log.write("aé✓bc")  # 1 + 2 + 3 bytes: the cut falls inside ✓
    log.write("more")
    log.flush()
    assert [(k, c) for k, c, _ in got] == [((1, 0), 3)]
    assert got[0][2].startswith("aé\n[bulkrunner: the log of this attempt reached")


def test_concurrent_run_items_with_a_sink(caplog: pytest.LogCaptureFixture) -> None:
    from bulkrunner.runtime import run_item

    caplog.set_level("INFO", logger="tests.log_tasks")
    got: dict[tuple[int, int], list[str]] = {}
    lock = threading.Lock()

    class Reporter:
        def __call__(self, *a: object) -> None: ...

        def log(self, key: tuple[int, int], claim: int, text: str) -> None:
            with lock:
                got.setdefault(key, []).append(text)

    def one(i: int) -> None:
        unit = work_unit("tests.log_tasks:chatter",
                         {"name": f"n{i}", "lines": 30, "delay": 0.001}, index=i,
                         task="chatter")
        assert run_item(unit, Reporter()).ok

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(4):
        own_lines("".join(got[(1, i)]), f"n{i}", ("out", "err", "log"), 30)


def test_a_version_1_database_gains_the_logs_table(tmp_path: Path) -> None:
    import sqlite3

    from bulkrunner.store import MIGRATIONS, Store

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = Store(str(path))
    try:
        assert store.version == len(MIGRATIONS) >= 2
        store.append_logs({(1, 0, 1): "dropped: no such job"})
        assert store.oldest_queued_at() is None
    finally:
        store.close()
