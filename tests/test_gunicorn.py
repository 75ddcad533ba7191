"""Several processes on one database: the embedding app under gunicorn with three workers,
and two ``bulkrunner serve`` processes as active and standby.

Any worker may submit; the one holding the dispatcher lease runs every item; SIGKILL of
that worker (or of everything) loses nothing, and only the items it had running run again.
Every run of a task appends a line to a marks file (tests/embed_app.py), which the tests
count. Real gunicorn, real processes, real SIGKILL.
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess, child_env, toml_config, wait_for
from tests.test_flask_ext import (
    JOBS,
    MOUNT,
    AppProcess,
    read_marks,
    submit_marks,
    wait_all_succeeded,
)

pytestmark = pytest.mark.slow

pytest.importorskip("gunicorn")

MAX_WORKERS = 4  # the embedding app's executor.max_workers


@functools.cache
def _no_control_socket() -> list[str]:
    """gunicorn 23+ may leave a control socket under ~/.gunicorn; turn it off where the
    installed version has the option."""
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    return ["--no-control-socket"] if "--no-control-socket" in out else []


def gunicorn_app(tmp_path: Path, *args: str, workers: int = 3) -> AppProcess:
    env = child_env({"EMBED_DB": str(tmp_path / "jobs.db"),
                     "EMBED_MARKS": str(tmp_path / "marks")})
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", "127.0.0.1:0",
            "--graceful-timeout", "5", *_no_control_socket(), *args,
            "tests.embed_app:from_env()"]
    return AppProcess(argv, tmp_path, env)


@pytest.fixture
def apps() -> Iterator[list[AppProcess]]:
    """The app servers a test starts; all killed after it."""
    started: list[AppProcess] = []
    yield started
    for app in started:
        app.kill()


def lease_holder(db: Path) -> int | None:
    """The pid of the process holding the dispatcher lease (None when nobody does)."""
    try:  # read-only: never create the file before the app does
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT holder, expires FROM leases WHERE name = "
                               "'dispatcher'").fetchone()
    except sqlite3.OperationalError:  # no database or no schema yet
        return None
    if row is None or row[1] < time.time():
        return None
    return int(row[0].split(":")[1])


def worker_pids(app: AppProcess) -> set[int]:
    """Pids of the gunicorn workers booted so far (from its log)."""
    return {int(line.rsplit(" ", 1)[1]) for line in app.log().splitlines()
            if "Booting worker with pid:" in line}


def test_three_workers_submit_and_one_runs_each_of_60_jobs_once(
        tmp_path: Path, apps: list[AppProcess]) -> None:
    app = gunicorn_app(tmp_path).start()
    apps.append(app)
    tags = [f"t{i}" for i in range(60)]

    def submit(tag: str) -> tuple[str, str, int]:
        r = app.post("/task", json={"task": "mark", "params": {"tag": tag, "sleep": 0.02},
                                    "hold": 0.05})
        assert r.status_code == 202, r.text
        return tag, r.json()["id"], r.json()["pid"]

    # Six requests at once, each holding its (sync) worker a moment: several workers answer.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(submit, tags))
    ids = {tag: ident for tag, ident, _ in answers}
    submitters = {pid for _, _, pid in answers}
    assert len(submitters) >= 2, f"every submission reached one worker: {submitters}"
    assert submitters <= worker_pids(app)
    wait_all_succeeded(app, ids, timeout=60)
    starts, ends, where = read_marks(tmp_path / "marks")
    assert starts == ends == dict.fromkeys(tags, 1), (starts, ends)
    # One worker ran them all: the lease holder.
    runners = {pid for pids in where.values() for pid in pids}
    assert runners == {lease_holder(tmp_path / "jobs.db")}, runners
    listed = app.get(JOBS, params={"state": "succeeded", "limit": 100}).json()["jobs"]
    assert len(listed) == 60


def test_sigkill_of_the_worker_holding_the_lease_loses_nothing(
        tmp_path: Path, apps: list[AppProcess]) -> None:
    app = gunicorn_app(tmp_path).start()
    apps.append(app)
    ids = submit_marks(app, [f"t{i}" for i in range(60)], sleep=0.25)
    marks = tmp_path / "marks"
    wait_for(lambda: sum(read_marks(marks)[1].values()) >= 12, 60, "a dozen jobs finish")
    holder = lease_holder(tmp_path / "jobs.db")
    assert holder in worker_pids(app), (holder, worker_pids(app))
    os.kill(holder, signal.SIGKILL)
    killed_at = time.monotonic()
    # Another worker takes the lease over and re-queues what the dead one had running.
    wait_for(lambda: lease_holder(tmp_path / "jobs.db") not in (None, holder), 30,
             "another worker takes the lease")
    took = time.monotonic() - killed_at
    wait_all_succeeded(app, ids, timeout=90)
    starts, ends, where = read_marks(marks)
    assert set(ends) == set(ids), "some job never ended"
    again = {tag for tag, n in starts.items() if n > 1}
    # A job ran twice only when its first run was in the killed worker (running there, or
    # ended there but not yet recorded), and it ran once anywhere else.
    for tag in again:
        assert holder in where[tag], (tag, where[tag], holder)
        assert sum(1 for pid in where[tag] if pid != holder) == 1, (tag, where[tag])
    assert len(again) <= 2 * MAX_WORKERS, again
    print(f"takeover seen after {took:.2f} s; {len(again)} job(s) ran again")


def test_kill_9_of_the_whole_app_loses_nothing(tmp_path: Path,
                                               apps: list[AppProcess]) -> None:
    app = gunicorn_app(tmp_path).start()
    apps.append(app)
    ids = submit_marks(app, [f"t{i}" for i in range(30)], sleep=0.2)
    wait_for(lambda: sum(read_marks(tmp_path / "marks")[1].values()) >= 5, 60,
             "a few jobs finish")
    app.kill()  # the master and every worker
    assert sum(read_marks(tmp_path / "marks")[1].values()) < 30
    again = gunicorn_app(tmp_path).start()
    apps.append(again)
    wait_all_succeeded(again, ids, timeout=90)
    starts, ends, _ = read_marks(tmp_path / "marks")
    assert set(ends) == set(ids)
    assert sum(starts.values()) - len(ids) <= 2 * MAX_WORKERS, starts


def test_preload_with_the_post_worker_init_hook(tmp_path: Path,
                                                apps: list[AppProcess]) -> None:
    # The README's recipe: the app is loaded in the master (--preload), and each worker
    # starts bulkrunner after the fork, before its first request.
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("def post_worker_init(worker):\n"
                    "    from tests.embed_app import runner\n"
                    "    runner.start(worker.wsgi)\n")
    app = gunicorn_app(tmp_path, "--preload", "-c", str(conf), workers=2).start()
    apps.append(app)
    db = tmp_path / "jobs.db"
    holder = wait_for(lambda: lease_holder(db), 30, "a worker takes the lease by itself")
    assert holder in worker_pids(app), "the master must not dispatch"
    ids = submit_marks(app, [f"p{i}" for i in range(10)], sleep=0.0)
    wait_all_succeeded(app, ids, timeout=60)
    health = app.get(f"{MOUNT}/healthz").json()
    assert health["status"] == "ok"


def test_two_serve_processes_share_one_database_as_active_and_standby(
        tmp_path: Path) -> None:
    cfg = toml_config(tmp_path, max_workers=2)
    with ServerProcess(cfg) as active, ServerProcess(cfg) as standby:
        def health(srv: ServerProcess) -> dict[str, object]:
            r = requests.get(f"{srv.url}/healthz", timeout=10)
            assert r.status_code == 200, r.text
            body: dict[str, object] = r.json()
            return body

        assert health(active)["dispatching"] is True
        assert health(standby)["dispatching"] is False

        def run_on(srv: ServerProcess, a: int) -> dict[str, object]:
            r = requests.post(f"{srv.url}/api/v1/jobs", timeout=10,
                              json={"task": "add", "params": {"a": a}})
            assert r.status_code == 202, r.text
            ident = r.json()["id"]

            def done() -> dict[str, object] | None:
                job: dict[str, object] = requests.get(f"{srv.url}/api/v1/jobs/{ident}",
                                                      timeout=10).json()
                return job if job["state"] in ("succeeded", "failed") else None
            found: dict[str, object] = wait_for(done, 30, f"job {ident} on {srv.url}")
            return found

        assert run_on(standby, 1)["result"] == 2  # submitted to the standby, run by the active
        active.signal(signal.SIGKILL)
        active.wait()
        job = run_on(standby, 2)
        assert job["state"] == "succeeded" and job["result"] == 3
        assert health(standby)["dispatching"] is True
